#ifndef X86_64_IDT_H
#define X86_64_IDT_H

#include "types.h"

/* Saved state, as pushed by isr.S and the CPU. */
struct isr_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rdi, rsi, rbp, rbx, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

void idt_init(void);	/* build the IDT (BSP, once) */
void idt_load(void);	/* load it on this CPU */

/*
 * Call fn(vector) for interrupts on vector (IRQ_VECTOR_BASE + 0 ..
 * IRQ_VECTORS - 1), then EOI the local APIC; NULL: an interrupt there is
 * reported as unexpected and ends the run.
 */
void idt_set_irq(unsigned vector, void (*fn)(unsigned vector));

#endif
