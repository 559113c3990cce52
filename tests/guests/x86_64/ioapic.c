/*
 * The I/O APIC (82093AA): IOREGSEL at +0x00, IOWIN at +0x10; register 1
 * holds the version and the last redirection entry, 0x10 + 2n / 0x11 + 2n
 * pin n's redirection entry (low / high dword).
 */
#include "acpi.h"
#include "firmware.h"
#include "io.h"
#include "ioapic.h"
#include "string.h"

#define IOREGSEL	0x00
#define IOWIN		0x10
#define IOAPIC_VER	0x01
#define REDTBL(n)	(0x10 + 2 * (n))

#define RTE_POLARITY_LOW	(1u << 13)
#define RTE_LEVEL		(1u << 15)
#define RTE_MASKED		(1u << 16)

static u32 rd(u64 base, u32 reg)
{
	mmio_write32(base + IOREGSEL, reg);
	return mmio_read32(base + IOWIN);
}

static void wr(u64 base, u32 reg, u32 v)
{
	mmio_write32(base + IOREGSEL, reg);
	mmio_write32(base + IOWIN, v);
}

unsigned ioapic_pins(u64 base)
{
	return ((rd(base, IOAPIC_VER) >> 16) & 0xff) + 1;
}

void ioapic_route(u64 base, unsigned pin, u8 vector, u16 flags, u32 apic_id)
{
	u32 lo = vector;	/* fixed delivery, physical destination */

	if (INTI_POLARITY(flags) == 3)
		lo |= RTE_POLARITY_LOW;
	if (INTI_TRIGGER(flags) == 3)
		lo |= RTE_LEVEL;
	wr(base, REDTBL(pin), RTE_MASKED);
	wr(base, REDTBL(pin) + 1, apic_id << 24);
	wr(base, REDTBL(pin), lo);
}

void ioapic_mask(u64 base, unsigned pin)
{
	wr(base, REDTBL(pin), rd(base, REDTBL(pin)) | RTE_MASKED);
}

bool ioapic_isa_route(unsigned irq, struct isa_route *r, const char **why)
{
	*r = (struct isa_route){ .gsi = irq };
	if (!acpi.have_madt) {
		*why = "no ACPI MADT";
		return false;
	}
	for (unsigned i = 0; i < acpi.nr_overrides; i++) {
		const struct acpi_override *o = &acpi.overrides[i];

		if (o->bus == 0 && o->source == irq) {
			r->gsi = o->gsi;
			r->flags = o->flags;
			r->override = true;
			break;
		}
	}
	for (unsigned i = 0; i < acpi.nr_ioapics; i++) {
		const struct acpi_ioapic *a = &acpi.ioapics[i];

		if (r->gsi < a->gsi_base || !a->addr)
			continue;
		if (r->gsi - a->gsi_base < ioapic_pins(a->addr)) {
			r->ioapic = a->addr;
			r->ioapic_id = a->id;
			r->pin = r->gsi - a->gsi_base;
			return true;
		}
	}
	*why = acpi.nr_ioapics ? "no I/O APIC in the MADT covers its GSI" : "no I/O APIC in the MADT";
	return false;
}

static bool mpf_valid(const u8 *p)
{
	return p[8] == 1 && checksum_ok(p, 16);
}

bool mptable_isa_route(unsigned irq, u8 *ioapic_id, unsigned *pin)
{
	u64 mpf = firmware_scan("_MP_", mpf_valid);
	const u8 *cfg, *p, *end;
	int isa = -1;

	if (!mpf || !get32(phys(mpf + 4)))
		return false;
	cfg = phys(get32(phys(mpf + 4)));
	if (get32(cfg) != get32("PCMP") || !checksum_ok(cfg, get16(cfg + 4)))
		return false;
	end = cfg + get16(cfg + 4);
	/* Bus entries come before the interrupt entries that name them. */
	for (p = cfg + 44; p < end && p[0] <= 4; p += p[0] ? 8 : 20) {
		if (p[0] == 1 && !memcmp(p + 2, "ISA", 3))
			isa = p[1];
		if (p[0] == 3 && p[1] == 0 && isa >= 0 && p[4] == isa && p[5] == irq) {
			*ioapic_id = p[6];
			*pin = p[7];
			return true;
		}
	}
	return false;
}
