/*
 * What an architecture provides for a PCI device's MSI (PCI Local Bus 3.0,
 * 6.8): the message address and data that deliver an interrupt to the boot
 * CPU, and interrupts on and off around a wait. An architecture that cannot
 * receive MSIs returns NULL from arch_msi_route with the reason, and the
 * test says so instead.
 */
#ifndef COMMON_MSI_H
#define COMMON_MSI_H

#include "types.h"

/*
 * Route one MSI of the PCI function with this requester id (bus << 8 |
 * device << 3 | function) to handler() on the boot CPU: fills *addr,
 * *data and a stable description (e.g. "vector 0x31"); NULL on success,
 * else why not.
 */
const char *arch_msi_route(u16 requester_id, void (*handler)(void), u64 *addr, u32 *data,
			   char *desc, unsigned desc_size);
/* Stop delivering that MSI (the handler is forgotten). */
void arch_msi_release(void);
/* Interrupts on / off on this CPU. */
void arch_irqs_on(void);
void arch_irqs_off(void);

#endif
