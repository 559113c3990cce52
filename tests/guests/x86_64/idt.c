/*
 * Exceptions print what happened and end the run through the normal exit
 * path, so a VMM bug shows up as text rather than a hang or triple fault.
 */
#include "apic.h"
#include "arch.h"
#include "idt.h"
#include "io.h"
#include "layout.h"
#include "printf.h"
#include "report.h"

#define PVPANIC_PORT 0x505	/* QEMU's ISA pvpanic (ACPI QEMU0001) */
#define PVPANIC_PANICKED 1

struct idt_gate {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __packed;

static struct idt_gate idt[256] __attribute__((aligned(16)));
static void (*volatile irq_handlers[IRQ_VECTORS])(unsigned vector);
extern const u64 isr_table[], isr_table_end[];

static const char *const names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "#09", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void idt_init(void)
{
	for (const u64 *p = isr_table; p < isr_table_end; p += 2) {
		struct idt_gate *g = &idt[p[0]];
		u64 a = p[1];

		g->off0 = a;
		g->sel = KERNEL_CS;
		g->ist = 0;
		g->type = 0x8e;		/* present, DPL 0, interrupt gate */
		g->off1 = a >> 16;
		g->off2 = a >> 32;
		g->zero = 0;
	}
}

void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __packed desc = { sizeof(idt) - 1, (uintptr_t)idt };

	__asm__ __volatile__("lidt %0" :: "m"(desc));
}

void idt_set_irq(unsigned vector, void (*fn)(unsigned vector))
{
	if (vector >= IRQ_VECTOR_BASE && vector < IRQ_VECTOR_BASE + IRQ_VECTORS)
		irq_handlers[vector - IRQ_VECTOR_BASE] = fn;
}

void isr_dispatch(struct isr_frame *f)
{
	static u32 nested[MAX_CPUS];
	unsigned cpu = arch_cpu_index() % MAX_CPUS;
	u64 cr2;

	if (f->vector == WAKEUP_VECTOR) {
		apic_eoi();
		return;
	}
	if (f->vector == SPURIOUS_VECTOR)
		return;
	if (f->vector >= IRQ_VECTOR_BASE && f->vector < IRQ_VECTOR_BASE + IRQ_VECTORS) {
		void (*fn)(unsigned) = irq_handlers[f->vector - IRQ_VECTOR_BASE];

		if (fn) {
			fn(f->vector);
			apic_eoi();
			return;
		}
	}

	if (nested[cpu]++)	/* faulted while reporting a fault */
		for (;;)
			arch_cpu_halt();
	__asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
	console_unlock_if_owner();
	report_fail("exception", "%s (vector %llu) error 0x%llx at rip 0x%llx "
		    "cr2 0x%llx rsp 0x%llx on cpu %u",
		    f->vector < 32 && names[f->vector] ? names[f->vector] : "?",
		    (unsigned long long)f->vector, (unsigned long long)f->error,
		    (unsigned long long)f->rip, (unsigned long long)cr2,
		    (unsigned long long)f->rsp, this_cpu()->apic_id);
	outb(PVPANIC_PORT, PVPANIC_PANICKED);	/* a pvpanic device, if any, hears of it */
	selftest_exit();
}
