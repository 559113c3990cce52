/*
 * ACPI: find the RSDP, walk the XSDT (or RSDT) checking every checksum,
 * collect the enabled CPUs from the MADT and the power-off registers from
 * the FADT, and take SLP_TYP for S5 from a minimal scan of the DSDT AML.
 */
#include "acpi.h"
#include "firmware.h"
#include "io.h"
#include "printf.h"
#include "report.h"
#include "string.h"

struct acpi_info acpi = { .s5_typ_a = -1, .s5_typ_b = -1 };

static unsigned bad;		/* problems found, for "ok acpi" */

/* struct acpi_table_header */
#define HDR_LEN		36
#define T_LENGTH(t)	get32((t) + 4)

static bool rsdp_valid(const u8 *p)
{
	if (memcmp(p, "RSD PTR ", 8) || !checksum_ok(p, 20))
		return false;
	if (p[15] >= 2) {	/* ACPI 2.0+: extended checksum */
		u32 len = get32(p + 20);
		return len >= 36 && len < 4096 && checksum_ok(p, len);
	}
	return true;
}

/* Map and check one system description table; NULL if unusable. */
static const u8 *table(u64 addr, const char *from)
{
	const u8 *t = phys(addr);
	u32 len;

	if (!addr || addr >= (1ull << 32) - HDR_LEN) {
		report_fail("acpi", "%s: table address 0x%llx unusable", from,
			    (unsigned long long)addr);
		bad++;
		return NULL;
	}
	len = T_LENGTH(t);
	info("acpi", "%.4s at 0x%llx len %u rev %u oem '%.6s' '%.8s'", (const char *)t,
	     (unsigned long long)addr, len, t[8], (const char *)t + 10,
	     (const char *)t + 16);
	if (len < HDR_LEN || len > (16u << 20) || addr + len > (1ull << 32)) {
		report_fail("acpi", "%.4s: bad length %u", (const char *)t, len);
		bad++;
		return NULL;
	}
	if (!checksum_ok(t, len)) {
		report_fail("acpi", "%.4s: bad checksum", (const char *)t);
		bad++;
		return NULL;
	}
	return t;
}

static void add_cpu(u32 id)
{
	for (unsigned i = 0; i < acpi.nr_cpus && i < ACPI_MAX_CPUS; i++)
		if (acpi.cpu_ids[i] == id)
			return;		/* listed as both LAPIC and x2APIC */
	if (acpi.nr_cpus < ACPI_MAX_CPUS)
		acpi.cpu_ids[acpi.nr_cpus] = id;
	acpi.nr_cpus++;
}

static void parse_madt(const u8 *t)
{
	const u8 *end = t + T_LENGTH(t);
	unsigned ioapics = 0;

	acpi.have_madt = true;
	acpi.lapic_addr = get32(t + 36);
	for (const u8 *p = t + 44; p + 2 <= end && p[1] >= 2 && p + p[1] <= end;
	     p += p[1]) {
		switch (p[0]) {
		case 0:		/* Processor Local APIC: flags bit 0 = enabled */
			if (p[1] >= 8 && (get32(p + 4) & 1))
				add_cpu(p[3]);
			break;
		case 1:		/* I/O APIC: id, address, GSI base */
			ioapics++;
			if (p[1] >= 12 && acpi.nr_ioapics < ACPI_MAX_IOAPICS)
				acpi.ioapics[acpi.nr_ioapics++] = (struct acpi_ioapic){
					p[2], get32(p + 4), get32(p + 8) };
			break;
		case 2:		/* Interrupt Source Override: bus, source, GSI, flags */
			if (p[1] >= 10 && acpi.nr_overrides < ACPI_MAX_OVERRIDES)
				acpi.overrides[acpi.nr_overrides++] = (struct acpi_override){
					.bus = p[2], .source = p[3], .gsi = get32(p + 4),
					.flags = get16(p + 8) };
			break;
		case 5:		/* Local APIC Address Override */
			if (p[1] >= 12)
				acpi.lapic_addr = get64(p + 4);
			break;
		case 9:		/* Processor Local x2APIC */
			if (p[1] >= 16 && (get32(p + 8) & 1))
				add_cpu(get32(p + 4));
			break;
		}
	}
	info("acpi", "madt: lapic 0x%llx, %u enabled cpus, %u ioapics",
	     (unsigned long long)acpi.lapic_addr, acpi.nr_cpus, ioapics);
}

/* One integer element of an AML package: ZeroOp, OneOp, Byte/WordPrefix. */
static int aml_small_int(const u8 *p, const u8 *end, const u8 **next)
{
	if (p >= end)
		return -1;
	switch (p[0]) {
	case 0x00: *next = p + 1; return 0;
	case 0x01: *next = p + 1; return 1;
	case 0x0a: *next = p + 2; return p + 1 < end ? p[1] : -1;
	case 0x0b: *next = p + 3; return p + 2 < end ? p[1] : -1;
	default: return -1;
	}
}

/* Find "Name(_S5_, Package(){a, b, ...})" in AML: "_S5_" 0x12 PkgLength N a b. */
static void scan_s5(const u8 *aml, u32 len)
{
	const u8 *end = aml + len;

	for (const u8 *p = aml + HDR_LEN; p + 8 < end; p++) {
		if (p[0] != '_' || p[1] != 'S' || p[2] != '5' || p[3] != '_' ||
		    p[4] != 0x12)
			continue;
		const u8 *q = p + 5 + 1 + (p[5] >> 6) + 1;	/* PkgLength, NumElements */

		acpi.s5_typ_a = aml_small_int(q, end, &q);
		if (acpi.s5_typ_a >= 0)
			acpi.s5_typ_b = aml_small_int(q, end, &q);
		if (acpi.s5_typ_a >= 0)
			return;
	}
}

static void gas_from_port(struct acpi_gas *g, u32 port)
{
	g->space = 1;
	g->bit_width = 16;
	g->address = port;
}

static void parse_fadt(const u8 *t)
{
	u32 len = T_LENGTH(t);
	u64 dsdt = get32(t + 40);
	const u8 *d;

	acpi.have_fadt = true;
	acpi.smi_cmd = get32(t + 48);
	acpi.acpi_enable = t[52];
	acpi.century = len > 108 ? t[108] : 0;
	acpi.boot_arch = len >= 111 ? get16(t + 109) : 0;
	gas_from_port(&acpi.pm1a_cnt, get32(t + 64));
	gas_from_port(&acpi.pm1b_cnt, get32(t + 68));
	if (len >= 116)
		acpi.hw_reduced = get32(t + 112) & (1u << 20);
	if (len >= 148 && get64(t + 140))
		dsdt = get64(t + 140);
	if (len >= 184 && get64(t + 176))
		memcpy(&acpi.pm1a_cnt, t + 172, sizeof(struct acpi_gas));
	if (len >= 196 && get64(t + 188))
		memcpy(&acpi.pm1b_cnt, t + 184, sizeof(struct acpi_gas));
	if (len >= 256)
		memcpy(&acpi.sleep_ctl, t + 244, sizeof(struct acpi_gas));

	d = table(dsdt, "FADT.DSDT");
	if (d)
		scan_s5(d, T_LENGTH(d));
	info("acpi", "fadt: %s, boot_arch 0x%x, pm1a_cnt %s 0x%llx, sleep_ctl %s 0x%llx, _S5 %d",
	     acpi.hw_reduced ? "hw-reduced" : "legacy", acpi.boot_arch,
	     acpi.pm1a_cnt.space ? "io" : "mem", (unsigned long long)acpi.pm1a_cnt.address,
	     acpi.sleep_ctl.space ? "io" : "mem", (unsigned long long)acpi.sleep_ctl.address,
	     acpi.s5_typ_a);
}

void acpi_init(u64 hint)
{
	const u8 *rsdp, *root;
	bool xsdt;
	u32 n;

	if (hint && hint < (1ull << 32) && rsdp_valid(phys(hint)))
		acpi.rsdp = hint;
	else
		acpi.rsdp = firmware_scan("RSD ", rsdp_valid);
	if (!acpi.rsdp) {
		info("acpi", "no RSDP (hint 0x%llx)", (unsigned long long)hint);
		return;
	}
	rsdp = phys(acpi.rsdp);
	xsdt = rsdp[15] >= 2 && get64(rsdp + 24);
	info("acpi", "rsdp at 0x%llx rev %u oem '%.6s'%s", (unsigned long long)acpi.rsdp,
	     rsdp[15], (const char *)rsdp + 9, acpi.rsdp == hint ? "" : " (scanned)");

	root = table(xsdt ? get64(rsdp + 24) : get32(rsdp + 16), "RSDP");
	if (!root)
		return;
	n = (T_LENGTH(root) - HDR_LEN) / (xsdt ? 8 : 4);
	for (u32 i = 0; i < n; i++) {
		const u8 *e = root + HDR_LEN + i * (xsdt ? 8 : 4);
		const u8 *t = table(xsdt ? get64(e) : get32(e), xsdt ? "XSDT" : "RSDT");

		if (!t)
			continue;
		if (!memcmp(t, "APIC", 4))
			parse_madt(t);
		else if (!memcmp(t, "FACP", 4))
			parse_fadt(t);
	}
	if (!acpi.have_madt)
		report_fail("acpi", "no MADT");
	else if (!acpi.have_fadt)
		report_fail("acpi", "no FADT");
	else if (!bad)
		report_ok("acpi", NULL);
}

static u32 gas_read(const struct acpi_gas *g)
{
	unsigned bits = g->bit_width ? g->bit_width : 8;

	if (g->space == 1)
		return bits > 16 ? inl(g->address) : bits > 8 ? inw(g->address) : inb(g->address);
	if (bits > 16)
		return *(volatile u32 *)phys(g->address);
	return bits > 8 ? *(volatile u16 *)phys(g->address) : *(volatile u8 *)phys(g->address);
}

static void gas_write(const struct acpi_gas *g, u32 v)
{
	unsigned bits = g->bit_width ? g->bit_width : 8;

	if (g->space == 1) {
		if (bits > 16)
			outl(g->address, v);
		else if (bits > 8)
			outw(g->address, v);
		else
			outb(g->address, v);
	} else if (bits > 16) {
		*(volatile u32 *)phys(g->address) = v;
	} else if (bits > 8) {
		*(volatile u16 *)phys(g->address) = v;
	} else {
		*(volatile u8 *)phys(g->address) = v;
	}
}

#define SLP_EN_PM1	(1u << 13)
#define SLP_TYP_PM1(t)	((u32)(t) << 10)
#define SLP_EN_HWR	(1u << 5)
#define SLP_TYP_HWR(t)	((u32)(t) << 2)

void acpi_poweroff(void)
{
	u32 typ_a = acpi.s5_typ_a >= 0 ? (u32)acpi.s5_typ_a : 5;
	u32 typ_b = acpi.s5_typ_b >= 0 ? (u32)acpi.s5_typ_b : typ_a;

	if (!acpi.have_fadt)
		return;
	if (acpi.hw_reduced && acpi.sleep_ctl.address) {
		gas_write(&acpi.sleep_ctl, SLP_TYP_HWR(typ_a & 7) | SLP_EN_HWR);
		return;
	}
	if (!acpi.pm1a_cnt.address)
		return;
	/* Legacy hardware may need switching to ACPI mode (SCI_EN) first. */
	if (acpi.smi_cmd && acpi.acpi_enable && !(gas_read(&acpi.pm1a_cnt) & 1)) {
		outb(acpi.smi_cmd, acpi.acpi_enable);
		for (unsigned i = 0; i < 100000 && !(gas_read(&acpi.pm1a_cnt) & 1); i++)
			__asm__ __volatile__("pause");
	}
	u32 v = gas_read(&acpi.pm1a_cnt) & ~(SLP_TYP_PM1(7) | SLP_EN_PM1);
	if (acpi.pm1b_cnt.address) {
		u32 w = gas_read(&acpi.pm1b_cnt) & ~(SLP_TYP_PM1(7) | SLP_EN_PM1);
		gas_write(&acpi.pm1b_cnt, w | SLP_TYP_PM1(typ_b & 7) | SLP_EN_PM1);
	}
	gas_write(&acpi.pm1a_cnt, v | SLP_TYP_PM1(typ_a & 7) | SLP_EN_PM1);
}
