/*
 * The arm64 Image header, the boot CPU's entry, the secondary CPUs' PSCI
 * CPU_ON entry and the exception vectors.
 *
 * Both entries arrive with the MMU off (the boot protocol and PSCI say so),
 * possibly at EL2 (a boot without a hypervisor): they drop to EL1h first,
 * then mask interrupts and set SP = the CPU's stack, TPIDR_EL1 = the CPU's
 * index, VBAR_EL1 = vectors, and turn the MMU on with the identity map
 * (idmap, below) before any C runs.
 */
#include "layout.h"

#define MAIR_VALUE	0xff00			/* attr0 Device-nGnRnE, attr1 Normal WB */
#define TCR_VALUE	((25 << 0) | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32))
					/* T0SZ 25, WB inner/outer, inner shareable, EPD1, 40-bit PA */
#define BLOCK_NORMAL	0x705			/* block, attr1, inner shareable, AF */
#define BLOCK_DEVICE	(0x401 | (3 << 53))	/* block, attr0, AF, PXN, UXN */

	.section .head, "ax"
	.globl _head
_head:
	b	primary_entry			/* code0 */
	.long	0				/* code1 */
	.quad	TEXT_OFFSET			/* text_offset */
	.quad	__image_size			/* image_size: image + .bss + stacks */
	.quad	0x2				/* flags: LE, 4K pages, placed low */
	.quad	0, 0, 0				/* res2-res4 */
	.ascii	"ARM\x64"			/* magic */
	.long	0				/* res5 */

	.text

/* If at EL2, continue at EL1h at the same address. Clobbers x9, x10. */
.macro	drop_to_el1
	mrs	x9, CurrentEL
	cmp	x9, #(2 << 2)
	b.ne	1f
	mov	x9, #(1 << 31)			/* HCR_EL2.RW: EL1 is AArch64 */
	msr	hcr_el2, x9
	mrs	x9, cnthctl_el2
	orr	x9, x9, #3			/* EL1 may use the physical counter/timer */
	msr	cnthctl_el2, x9
	msr	cntvoff_el2, xzr
	mov	x9, #0x3c5			/* EL1h, DAIF masked */
	msr	spsr_el2, x9
	adr	x10, 1f
	msr	elr_el2, x10
	isb
	eret
1:
.endm

/*
 * The MMU on, with the identity map below (so that C may use unaligned and
 * exclusive accesses to RAM, which Device memory - all of it, MMU off -
 * does not allow). Clobbers x9.
 */
.macro	enable_mmu
	ldr	x9, =MAIR_VALUE
	msr	mair_el1, x9
	ldr	x9, =TCR_VALUE
	msr	tcr_el1, x9
	adrp	x9, idmap
	add	x9, x9, :lo12:idmap
	msr	ttbr0_el1, x9
	isb
	tlbi	vmalle1
	dsb	nsh
	isb
	mrs	x9, sctlr_el1
	orr	x9, x9, #(1 << 0)		/* M: MMU on */
	orr	x9, x9, #(1 << 2)		/* C: data caches */
	orr	x9, x9, #(1 << 12)		/* I: instruction caches */
	bic	x9, x9, #(1 << 1)		/* A: no alignment checks */
	msr	sctlr_el1, x9
	isb
	ic	iallu
	dsb	nsh
	isb
.endm

/* SP = top of stack of CPU x0, TPIDR_EL1 = x0, vectors, MMU. Clobbers x9, x10. */
.macro	cpu_setup
	enable_mmu
	msr	daifset, #0xf
	msr	tpidr_el1, x0
	adrp	x9, stacks
	add	x9, x9, :lo12:stacks
	mov	x10, #STACK_SIZE
	madd	x9, x0, x10, x9
	add	sp, x9, x10
	adrp	x9, vectors
	add	x9, x9, :lo12:vectors
	msr	vbar_el1, x9
	isb
.endm

primary_entry:
	mov	x19, x0				/* the DTB */
	drop_to_el1
	adrp	x0, __bss_start
	add	x0, x0, :lo12:__bss_start
	adrp	x1, __bss_end
	add	x1, x1, :lo12:__bss_end
1:	cmp	x0, x1
	b.hs	2f
	str	xzr, [x0], #8
	b	1b
2:	mov	x0, #0
	cpu_setup
	mov	x0, x19
	bl	arch_main
3:	wfi
	b	3b

/* PSCI CPU_ON entry: x0 = context (cpu index | CTX_*). */
	.globl secondary_entry
secondary_entry:
	mov	x19, x0
	drop_to_el1
	and	x0, x19, #0xff
	cpu_setup
	mov	x0, x19
	bl	secondary_main
1:	wfi
	b	1b

/*
 * Vectors: 16 entries of 0x80 bytes. Each calls exception(kind, esr, elr,
 * far, spsr) on the current stack; it does not return. The one exception:
 * an IRQ taken at EL1h (kind 5) goes to irq_entry, which returns to the
 * interrupted code when irq_dispatch() (gic.c) handled it.
 */
.macro	vector kind
	.balign	0x80
	.if	\kind == 5
	b	irq_entry
	.endif
	sub	sp, sp, #16
	stp	x29, x30, [sp]
	mov	x0, #\kind
	mrs	x1, esr_el1
	mrs	x2, elr_el1
	mrs	x3, far_el1
	mrs	x4, spsr_el1
	bl	exception
	b	.
.endm

/* Saves what the AAPCS64 lets a C function clobber (x0-x18, x29, x30). */
	.text
irq_entry:
	sub	sp, sp, #176
	stp	x0, x1, [sp, #0]
	stp	x2, x3, [sp, #16]
	stp	x4, x5, [sp, #32]
	stp	x6, x7, [sp, #48]
	stp	x8, x9, [sp, #64]
	stp	x10, x11, [sp, #80]
	stp	x12, x13, [sp, #96]
	stp	x14, x15, [sp, #112]
	stp	x16, x17, [sp, #128]
	stp	x18, x29, [sp, #144]
	str	x30, [sp, #160]
	bl	irq_dispatch
	cbz	x0, 1f
	ldp	x0, x1, [sp, #0]
	ldp	x2, x3, [sp, #16]
	ldp	x4, x5, [sp, #32]
	ldp	x6, x7, [sp, #48]
	ldp	x8, x9, [sp, #64]
	ldp	x10, x11, [sp, #80]
	ldp	x12, x13, [sp, #96]
	ldp	x14, x15, [sp, #112]
	ldp	x16, x17, [sp, #128]
	ldp	x18, x29, [sp, #144]
	ldr	x30, [sp, #160]
	add	sp, sp, #176
	eret
1:	mov	x0, #5
	mrs	x1, esr_el1
	mrs	x2, elr_el1
	mrs	x3, far_el1
	mrs	x4, spsr_el1
	bl	exception
	b	.

	.section .vectors, "ax"
	.balign	2048
	.globl vectors
vectors:
	.irp	kind, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
	vector	\kind
	.endr

/*
 * The identity map: 512 1 GiB blocks at level 1 (4 KiB granule, 39-bit
 * addresses). [0, 1 GiB) - the devices - is Device-nGnRnE and never
 * executable; the rest is Normal write-back memory (RAM from 1 GiB).
 */

	.section .data.idmap, "aw"
	.balign	4096
idmap:
	.quad	BLOCK_DEVICE
	.set	gib, 1
	.rept	511
	.quad	(gib << 30) | BLOCK_NORMAL
	.set	gib, gib + 1
	.endr

	.section .stacks, "aw", %nobits
	.balign	STACK_SIZE
	.globl stacks
stacks:
	.skip	MAX_CPUS * STACK_SIZE
