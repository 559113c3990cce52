/*
 * Entry points. The image is linked and loaded at 1 MiB (KERNEL_LOAD):
 *   KERNEL_LOAD + 0x000  _start32     Linux 32-bit boot protocol, %esi = boot_params
 *   KERNEL_LOAD + 0x200  _start64     Linux 64-bit boot protocol, %rsi = boot_params
 *                        (the ELF entry point)
 *   pvh_start32 (in the Xen PVH ELF note)  %ebx = struct hvm_start_info
 * All of them switch to our own GDT, page tables (low 4 GiB identity-mapped
 * with 2 MiB pages) and stack, then call arch_main().
 */
#include "layout.h"

/* Switch on long mode from flat 32-bit protected mode (paging off). */
.macro LONG_MODE_ON
	movl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	$CR0_VALUE, %eax
	movl	%eax, %cr0
.endm

.macro LOAD_DATA_SEGMENTS
	movl	$KERNEL_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
.endm

	.section .head, "ax"
	.code32
	.globl	_start32
_start32:
	cli
	cld
	movl	%esi, boot_data
	movl	$BOOT_LINUX32, boot_method
	movl	%ebp, boot_ebp
	jmp	enter_long_mode

	.org	0x200
	.code64
	.globl	_start64
_start64:
	cli
	cld
	movq	$stacks + STACK_SIZE, %rsp	/* the loader gives no stack */
	movl	%esi, boot_data(%rip)
	movl	$BOOT_LINUX64, boot_method(%rip)
	lgdt	gdt_desc(%rip)
	movl	$pml4, %eax
	movq	%rax, %cr3
	pushq	$KERNEL_CS
	pushq	$start64
	lretq

	.text
	.code32
	.globl	pvh_start32
pvh_start32:
	cli
	cld
	movl	%ebx, boot_data
	movl	$BOOT_PVH, boot_method
enter_long_mode:
	lgdt	gdt_desc
	ljmp	$CODE32_CS, $1f
1:	LOAD_DATA_SEGMENTS
	LONG_MODE_ON
	ljmp	$KERNEL_CS, $start64

	.code64
start64:
	LOAD_DATA_SEGMENTS
	movq	$stacks + STACK_SIZE, %rsp	/* the BSP uses stack 0 */
	movq	$__bss_start, %rdi
	movq	$__bss_end, %rcx
	xorl	%eax, %eax
1:	cmpq	%rcx, %rdi			/* zero .bss, 8 bytes a store */
	jae	2f
	movq	%rax, (%rdi)
	addq	$8, %rdi
	jmp	1b
2:	call	arch_main
3:	cli
	hlt
	jmp	3b

/*
 * Application processors arrive here from the real-mode trampoline
 * (trampoline.S) in flat 32-bit mode, with our GDT loaded.
 */
	.code32
	.globl	ap_start32
ap_start32:
	LOAD_DATA_SEGMENTS
	LONG_MODE_ON
	ljmp	$KERNEL_CS, $ap_start64

	.code64
ap_start64:
	LOAD_DATA_SEGMENTS
	movq	ap_stack_top(%rip), %rsp
	call	ap_main
1:	cli
	hlt
	jmp	1b

	.data
	.globl	boot_data, boot_method, boot_ebp
	.balign	8
boot_data:	.quad 0		/* physical address of boot_params / start_info */
boot_method:	.long 0		/* BOOT_* */
boot_ebp:	.long 0		/* %ebp at the 32-bit entry */

	.balign	8
	.globl	gdt
gdt:
	.quad	0
	.quad	0x00af9b000000ffff	/* KERNEL_CS: 64-bit code */
	.quad	0x00cf93000000ffff	/* KERNEL_DS: flat data */
	.quad	0x00cf9b000000ffff	/* CODE32_CS: flat 32-bit code */
gdt_end:
	.if	gdt_end - gdt - 1 != GDT_LIMIT
	.error	"GDT_LIMIT is wrong"
	.endif
	.balign	8
	.word	0
gdt_desc:
	.word	GDT_LIMIT
	.quad	gdt

/* Page tables: the low 4 GiB identity-mapped, 3-4 GiB (MMIO) uncached. */
	.section .data.pagetables, "aw"
	.balign	4096
	.globl	pml4
pml4:	.quad	pdpt + 0x003		/* present, writable */
	.fill	511, 8, 0
pdpt:	.quad	pd + 0x0003, pd + 0x1003, pd + 0x2003, pd + 0x3003
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	1536
	.quad	(i << 21) | 0x83	/* present, writable, 2 MiB */
	.set	i, i + 1
	.endr
	.rept	512
	.quad	(i << 21) | 0x9b	/* + PWT | PCD */
	.set	i, i + 1
	.endr

/* Per-CPU stacks: not part of the image, not zeroed. */
	.section .stacks, "aw", @nobits
	.balign	STACK_SIZE
	.globl	stacks
stacks:	.skip	MAX_CPUS * STACK_SIZE

/* Xen PVH entry: XEN_ELFNOTE_PHYS32_ENTRY (18). */
	.section .note.xen, "a", @note
	.balign	4
	.long	4			/* namesz */
	.long	8			/* descsz */
	.long	18			/* type */
	.asciz	"Xen"
	.balign	4
	.quad	pvh_start32
	.balign	4
