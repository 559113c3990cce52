/*
 * The real-mode part of selftest.bzImage (Linux boot protocol, boot.rst):
 * the setup header, and a small 16-bit stub for loaders that enter in real
 * mode (at setup + 0x200 with CS = base + 0x20, DS = ES = SS = base). The
 * stub fetches the E820 map into this very page, which it then hands to
 * the kernel as boot_params: it enables A20, enters flat 32-bit protected
 * mode and jumps to code32_start with %esi = boot_params.
 * mkbzimage.py fills in syssize and init_size.
 */
#include "layout.h"

#define SETUP_SECTS	7		/* + the boot sector = 4 KiB = boot_params */
#define E820_ENTRIES	0x1e8		/* boot_params offsets */
#define E820_TABLE	0x2d0
#define E820_MAX	128
#define SMAP		0x534d4150
#define BOOT_CS		0x10		/* Linux's __BOOT_CS / __BOOT_DS */
#define BOOT_DS		0x18

	.section .setup, "ax"
	.code16
	.globl	_setup
_setup:
	.org	0x1f1
	.byte	SETUP_SECTS		/* setup_sects */
	.word	0			/* root_flags */
	.long	0			/* syssize: patched */
	.word	0			/* ram_size */
	.word	0xffff			/* vid_mode: normal */
	.word	0			/* root_dev */
	.word	0xaa55			/* boot_flag */
	/* 0x200 */
	.byte	0xeb, jump - 1f		/* jump: short, over the header */
1:	.ascii	"HdrS"			/* header */
	.word	0x020e			/* version 2.14 */
	.long	0			/* realmode_swtch */
	.word	0x1000			/* start_sys_seg (obsolete) */
	.word	kernel_version - 0x200	/* kernel_version */
	.byte	0			/* type_of_loader */
	.byte	0x01			/* loadflags: LOADED_HIGH */
	.word	0			/* setup_move_size */
	.long	KERNEL_LOAD		/* code32_start */
	.long	0			/* ramdisk_image */
	.long	0			/* ramdisk_size */
	.long	0			/* bootsect_kludge */
	.word	0			/* heap_end_ptr */
	.byte	0			/* ext_loader_ver */
	.byte	0			/* ext_loader_type */
	.long	0			/* cmd_line_ptr */
	.long	0x37ffffff		/* initrd_addr_max */
	.long	0x100000		/* kernel_alignment */
	.byte	0			/* relocatable_kernel: no */
	.byte	20			/* min_alignment: 1 MiB (log2) */
	.word	0x0001			/* xloadflags: XLF_KERNEL_64 */
	.long	2047			/* cmdline_size */
	.long	0			/* hardware_subarch: PC */
	.quad	0			/* hardware_subarch_data */
	.long	0			/* payload_offset */
	.long	0			/* payload_length */
	.quad	0			/* setup_data */
	.quad	KERNEL_LOAD		/* pref_address */
	.long	0			/* init_size: patched */
	.long	0			/* handover_offset: no EFI */
	.long	0			/* kernel_info_offset */
	/* 0x26c: still inside boot_params' padding */
jump:	jmp	start16

	/* boot_params ends its E820 table at 0xcd0; code goes after it. */
	.org	0xd00
start16:
	cli
	cld
	movw	%ds, %ax		/* the base of this page, per the protocol */
	movw	%ax, %es
	movw	%ax, %ss
	movw	$0x8000, %sp		/* below the command line at base + 0x10000 */

	/* E820: append entries at E820_TABLE, count them at E820_ENTRIES. */
	movb	$0, E820_ENTRIES
	movw	$E820_TABLE, %di
	xorl	%ebx, %ebx
2:	movl	$0xe820, %eax
	movl	$SMAP, %edx
	movl	$20, %ecx
	int	$0x15
	jc	3f
	cmpl	$SMAP, %eax
	jne	3f
	addw	$20, %di
	incb	E820_ENTRIES
	cmpb	$E820_MAX, E820_ENTRIES
	jae	3f
	testl	%ebx, %ebx
	jnz	2b
3:
	inb	$0x92, %al		/* fast A20 */
	orb	$0x02, %al
	andb	$0xfe, %al
	outb	%al, $0x92

	xorl	%ebx, %ebx		/* %ebx = linear address of this page */
	movw	%ds, %bx
	shll	$4, %ebx
	leal	gdt(%ebx), %eax
	movl	%eax, gdt_desc + 2
	leal	pm32(%ebx), %eax
	movl	%eax, pm32_ptr
	lgdtl	gdt_desc
	movl	%cr0, %eax
	orb	$CR0_PE, %al
	movl	%eax, %cr0
	ljmpl	*pm32_ptr		/* DS still has its real-mode base here */

	.code32
pm32:
	movl	$BOOT_DS, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%eax, %ss
	movl	%ebx, %esi		/* boot_params */
	movl	0x214(%esi), %eax	/* code32_start */
	movl	$SETUP16_MAGIC, %ebp	/* tells the kernel who called */
	xorl	%ebx, %ebx
	xorl	%edi, %edi
	jmp	*%eax

	.balign	8
gdt:	.quad	0, 0
	.quad	0x00cf9b000000ffff	/* BOOT_CS */
	.quad	0x00cf93000000ffff	/* BOOT_DS */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	0			/* patched: linear address of gdt */
pm32_ptr:
	.long	0			/* patched: linear address of pm32 */
	.word	BOOT_CS
kernel_version:
	.asciz	"vmmkit-selftest v1"

	.org	(SETUP_SECTS + 1) * 512
