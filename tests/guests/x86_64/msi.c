/*
 * x86 MSIs (Intel SDM vol. 3, 11.11): address 0xFEExx000 with the
 * destination APIC id in bits 19:12 (physical mode, no redirection hint),
 * data = the vector (fixed delivery, edge). The vector is the second device
 * vector (IRQ_VECTOR_BASE + 1), delivered to the boot CPU. I/O APIC pins
 * stay as they are (masked, unless a test routed one).
 */
#include "apic.h"
#include "idt.h"
#include "io.h"
#include "layout.h"
#include "msi.h"
#include "printf.h"

#define MSI_VECTOR	(IRQ_VECTOR_BASE + 1)

static void (*msi_handler)(void);

static void on_msi(unsigned vector)
{
	(void)vector;
	if (msi_handler)
		msi_handler();
}

const char *arch_msi_route(u16 requester_id, void (*handler)(void), u64 *addr, u32 *data,
			   char *desc, unsigned desc_size)
{
	u32 dest = apic_id();

	(void)requester_id;	/* no interrupt remapping: the address and data say it all */
	if (dest > 0xff)
		return "the boot CPU's APIC id does not fit an xAPIC MSI address";
	/* Only the MSI may interrupt: mask both 8259s (a BIOS left the PIT on IRQ 0, vector 8). */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	msi_handler = handler;
	idt_set_irq(MSI_VECTOR, on_msi);
	*addr = 0xfee00000u | dest << 12;
	*data = MSI_VECTOR;
	snprintf(desc, desc_size, "vector 0x%x", MSI_VECTOR);
	return NULL;
}

void arch_msi_release(void)
{
	idt_set_irq(MSI_VECTOR, NULL);
	msi_handler = NULL;
}

void arch_irqs_on(void) { __asm__ __volatile__("sti" ::: "memory"); }
void arch_irqs_off(void) { __asm__ __volatile__("cli" ::: "memory"); }
