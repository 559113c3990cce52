#include "firmware.h"

bool checksum_ok(const void *p, u32 len)
{
	const u8 *b = p;
	u8 sum = 0;

	while (len--)
		sum += *b++;
	return sum == 0;
}

static u64 scan(u64 start, u64 len, u32 sig, bool (*valid)(const u8 *p))
{
	for (u64 a = start; a + 16 <= start + len; a += 16) {
		const u8 *p = phys(a);

		if (get32(p) == sig && valid(p))
			return a;
	}
	return 0;
}

u64 firmware_scan(const char *sig, bool (*valid)(const u8 *p))
{
	u32 s = get32(sig);
	u64 ebda = (u64)get16(phys(0x40e)) << 4;	/* BIOS data area */
	u64 a = 0;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		a = scan(ebda, 1024, s, valid);
	if (!a)
		a = scan(0x9fc00, 1024, s, valid);
	if (!a)
		a = scan(0xe0000, 0x20000, s, valid);
	return a;
}
