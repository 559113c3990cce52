/*
 * Real-mode start-up code for application processors. The BSP copies
 * [ap_trampoline, ap_trampoline_end) to TRAMPOLINE_ADDR and sends SIPI
 * vector TRAMPOLINE_ADDR >> 12; the AP starts with CS = that << 8, IP = 0.
 * It loads the kernel's GDT and jumps to ap_start32 (entry.S) in flat
 * 32-bit mode, which goes on to long mode with the BSP's page tables.
 */
#include "layout.h"

	.section .rodata
	.code16
	.globl	ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	tramp_gdt_desc - ap_trampoline
	movl	$CR0_PE, %eax		/* also clears CD/NW left by INIT */
	movl	%eax, %cr0
	ljmpl	$CODE32_CS, $ap_start32
	.balign	4
tramp_gdt_desc:
	.word	GDT_LIMIT
	.long	gdt
ap_trampoline_end:
