/*
 * Interrupt and exception stubs. Each pushes a dummy error code where the
 * CPU pushes none, then the vector, saves the general registers and calls
 * isr_dispatch(struct isr_frame *) (idt.c).
 */
#include "layout.h"

	.text
	.code64

.macro ISR name, vec, err=0
	.balign	16
isr_\name:
	.if	\err == 0
	pushq	$0
	.endif
	pushq	$\vec
	jmp	isr_common
.endm

	.irp	v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
	ISR	\v, \v
	.endr
	.irp	v, 8,10,11,12,13,14,17,21,29,30
	ISR	\v, \v, 1
	.endr
	ISR	irq0, IRQ_VECTOR_BASE
	ISR	irq1, IRQ_VECTOR_BASE + 1
	ISR	wakeup, WAKEUP_VECTOR
	ISR	spurious, SPURIOUS_VECTOR

isr_common:
	pushq	%rax
	pushq	%rcx
	pushq	%rdx
	pushq	%rbx
	pushq	%rbp
	pushq	%rsi
	pushq	%rdi
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	cld
	call	isr_dispatch
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rdi
	popq	%rsi
	popq	%rbp
	popq	%rbx
	popq	%rdx
	popq	%rcx
	popq	%rax
	addq	$16, %rsp		/* vector, error code */
	iretq

/* Vector number and stub address pairs, for idt_init(). */
	.section .rodata
	.balign	8
	.globl	isr_table, isr_table_end
isr_table:
	.irp	v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad	\v, isr_\v
	.endr
	.quad	IRQ_VECTOR_BASE, isr_irq0
	.quad	IRQ_VECTOR_BASE + 1, isr_irq1
	.quad	WAKEUP_VECTOR, isr_wakeup
	.quad	SPURIOUS_VECTOR, isr_spurious
isr_table_end:
