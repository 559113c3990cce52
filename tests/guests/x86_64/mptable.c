#include "firmware.h"
#include "mptable.h"
#include "report.h"

static bool mpf_valid(const u8 *p)
{
	return p[8] == 1 && checksum_ok(p, 16);		/* length in paragraphs */
}

unsigned mptable_cpus(u32 *ids, unsigned max)
{
	u64 mpf = firmware_scan("_MP_", mpf_valid);
	const u8 *cfg, *p, *end;
	unsigned n = 0;

	if (!mpf)
		return 0;
	cfg = phys(get32(phys(mpf + 4)));
	if (!get32(phys(mpf + 4)) || get32(cfg) != get32("PCMP") ||
	    !checksum_ok(cfg, get16(cfg + 4))) {
		report_fail("mptable", "no valid configuration table (default configurations unsupported)");
		return 0;
	}
	info("mptable", "at 0x%llx, config table at 0x%x",
	     (unsigned long long)mpf, get32(phys(mpf + 4)));
	/* Walk by the table length, as Linux does: some firmware leaves the entry count 0. */
	p = cfg + 44;
	end = cfg + get16(cfg + 4);
	while (p < end && p[0] <= 4) {
		if (p[0] == 0) {		/* processor: flags bit 0 = enabled */
			if (p[3] & 1) {
				if (n < max)
					ids[n] = p[1];
				n++;
			}
			p += 20;
		} else {			/* bus, I/O APIC, interrupt entries */
			p += 8;
		}
	}
	return n;
}
