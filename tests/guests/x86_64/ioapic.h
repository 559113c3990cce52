/* The I/O APIC: where an ISA IRQ arrives, and programming one pin. */
#ifndef X86_64_IOAPIC_H
#define X86_64_IOAPIC_H

#include "types.h"

/* MPS INTI flags (MADT overrides and MP table entries alike). */
#define INTI_POLARITY(f)	((f) & 3)		/* 0 bus default, 1 high, 3 low */
#define INTI_TRIGGER(f)		(((f) >> 2) & 3)	/* 0 bus default, 1 edge, 3 level */

/* Where ISA IRQ irq reaches an I/O APIC. */
struct isa_route {
	u32 gsi;
	u16 flags;		/* INTI flags; 0 = ISA default (edge, active high) */
	bool override;		/* from an interrupt source override (else identity) */
	u64 ioapic;		/* the I/O APIC's MMIO address */
	u8 ioapic_id;
	unsigned pin;		/* its input pin */
};

/*
 * From the ACPI MADT: the interrupt source override for ISA IRQ irq, else
 * GSI = irq; then the I/O APIC whose range holds the GSI. False (with a
 * reason in *why) if there is no MADT or no I/O APIC for it.
 */
bool ioapic_isa_route(unsigned irq, struct isa_route *r, const char **why);

/* From the MP table's I/O interrupt entries (ISA bus): the I/O APIC id and pin. */
bool mptable_isa_route(unsigned irq, u8 *ioapic_id, unsigned *pin);

/* Number of redirection entries (pins) of the I/O APIC at base. */
unsigned ioapic_pins(u64 base);

/* Route pin to vector, fixed delivery, physical destination apic_id; unmasked. */
void ioapic_route(u64 base, unsigned pin, u8 vector, u16 inti_flags, u32 apic_id);
void ioapic_mask(u64 base, unsigned pin);

#endif
