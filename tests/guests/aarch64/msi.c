/*
 * AArch64 MSIs would need the GICv3 ITS (device and collection tables, a
 * command queue, LPI configuration and pending tables): not implemented, so
 * PCI tests read their device's interrupt status instead (and say so).
 */
#include "msi.h"

const char *arch_msi_route(void (*handler)(void), u64 *addr, u32 *data, char *desc,
			   unsigned desc_size)
{
	(void)handler, (void)addr, (void)data, (void)desc, (void)desc_size;
	return "no GICv3 ITS driver in the AArch64 guest";
}

void arch_msi_release(void) {}
void arch_irqs_on(void) { __asm__ __volatile__("msr daifclr, #2" ::: "memory"); }
void arch_irqs_off(void) { __asm__ __volatile__("msr daifset, #2" ::: "memory"); }
