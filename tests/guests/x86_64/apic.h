/* The local APIC, in xAPIC (MMIO) or x2APIC (MSR) mode, whichever is on. */
#ifndef X86_64_APIC_H
#define X86_64_APIC_H

#include "types.h"

void apic_init(u64 madt_base);	/* BSP: find the LAPIC and its mode */
void apic_enable(void);		/* every CPU: enable it */
u32 apic_id(void);
void apic_eoi(void);
bool apic_x2apic(void);
u64 apic_base(void);

/* Send INIT, or STARTUP with the given vector, to one CPU. */
bool apic_send_init(u32 dest);
bool apic_send_sipi(u32 dest, u8 vector);
/* Fixed-vector IPI to all CPUs but this one. */
bool apic_send_others(u8 vector);

#endif
