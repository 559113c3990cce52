/* Constants shared by the x86-64 assembly, C and linker script. */
#ifndef X86_64_LAYOUT_H
#define X86_64_LAYOUT_H

#define KERNEL_LOAD	0x100000	/* link and load address (1 MiB) */

/* Our GDT. */
#define KERNEL_CS	0x08		/* 64-bit code */
#define KERNEL_DS	0x10		/* flat data */
#define CODE32_CS	0x18		/* flat 32-bit code */
#define GDT_LIMIT	(4 * 8 - 1)

/* One stack per CPU, STACK_SIZE aligned; struct percpu sits at its base. */
#define STACK_SIZE	0x2000
#define MAX_CPUS	64

/* The AP real-mode trampoline is copied here: SIPI vector 0x08. */
#define TRAMPOLINE_ADDR	0x8000

/* How we were entered (boot_method). */
#define BOOT_PVH	1
#define BOOT_LINUX64	2
#define BOOT_LINUX32	3
/* %ebp at the 32-bit entry when our own real-mode setup code ran. */
#define SETUP16_MAGIC	0x36314d52	/* "RM16" */

#define CR0_PE		0x00000001
#define CR0_VALUE	0x80000031	/* PG | NE | ET | PE; CD/NW clear */
#define CR4_PAE		0x00000020
#define MSR_EFER	0xc0000080
#define EFER_LME	0x00000100

/* Interrupt vectors. IRQ_VECTOR_BASE.. + IRQ_VECTORS - 1: device interrupts (idt_set_irq). */
#define IRQ_VECTOR_BASE	0x30
#define IRQ_VECTORS	2
#define WAKEUP_VECTOR	0xf0		/* IPI that wakes halted APs */
#define SPURIOUS_VECTOR	0xff

#endif
