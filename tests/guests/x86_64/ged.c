/*
 * The ACPI power button as Cloud Hypervisor (and vmmkit) provide it: a
 * Generic Event Device whose notification byte is the field GDAT of
 * "OperationRegion (GDST, <space>, <address>, 1)" in the DSDT; reading it
 * clears it, and bit 0x08 means the power button was pressed. There is no
 * AML interpreter here: the region is found by name, and test=spin polls
 * the byte. No such region (QEMU, firmware without one): never pressed.
 */
#include "acpi.h"
#include "arch.h"
#include "io.h"
#include "string.h"

#define GED_POWER_BUTTON	0x08
#define HDR_LEN			36

static int ged_state;		/* 0: not looked for yet, 1: found, -1: none */
static u8 ged_space;		/* 0: SystemMemory, 1: SystemIO */
static u64 ged_addr;

static const u8 *find_dsdt(void)
{
	const u8 *rsdp, *root;
	bool xsdt;
	u32 n;

	if (!acpi.rsdp)
		return NULL;
	rsdp = phys(acpi.rsdp);
	xsdt = rsdp[15] >= 2 && get64(rsdp + 24);
	root = phys(xsdt ? get64(rsdp + 24) : get32(rsdp + 16));
	n = (get32(root + 4) - HDR_LEN) / (xsdt ? 8 : 4);
	for (u32 i = 0; i < n && i < 64; i++) {
		const u8 *e = root + HDR_LEN + i * (xsdt ? 8 : 4);
		u64 addr = xsdt ? get64(e) : get32(e);
		const u8 *t = phys(addr);

		if (!addr || addr >= (1ull << 32) || memcmp(t, "FACP", 4))
			continue;
		addr = get32(t + 4) >= 148 && get64(t + 140) ? get64(t + 140) : get32(t + 40);
		return addr && addr < (1ull << 32) ? phys(addr) : NULL;
	}
	return NULL;
}

/* An AML integer: ZeroOp, OneOp, Byte/Word/DWord/QWordPrefix. */
static bool aml_int(const u8 *p, const u8 *end, u64 *v)
{
	unsigned len;

	switch (p[0]) {
	case 0x00: *v = 0; return true;
	case 0x01: *v = 1; return true;
	case 0x0a: len = 1; break;
	case 0x0b: len = 2; break;
	case 0x0c: len = 4; break;
	case 0x0e: len = 8; break;
	default: return false;
	}
	if (p + 1 + len > end)
		return false;
	*v = 0;
	for (unsigned i = 0; i < len; i++)
		*v |= (u64)p[1 + i] << (8 * i);
	return true;
}

static void ged_find(void)
{
	const u8 *d = find_dsdt(), *end;

	ged_state = -1;
	if (!d || get32(d + 4) < HDR_LEN || get32(d + 4) > (1u << 20))
		return;
	end = d + get32(d + 4);
	for (const u8 *p = d + HDR_LEN; p + 8 < end; p++) {
		/* ExtOpPrefix OpRegionOp NameSeg RegionSpace RegionOffset RegionLen */
		if (p[0] != 0x5b || p[1] != 0x80 || memcmp(p + 2, "GDST", 4) || p[6] > 1)
			continue;
		if (aml_int(p + 7, end, &ged_addr)) {
			ged_space = p[6];
			ged_state = 1;
		}
		return;
	}
}

/* Called by test=spin: whether the power button was pressed since the last call. */
bool arch_power_button(void)
{
	u8 v;

	if (!ged_state)
		ged_find();
	if (ged_state < 0)
		return false;
	v = ged_space ? inb(ged_addr) : mmio_read8(ged_addr);
	return v & GED_POWER_BUTTON;
}
