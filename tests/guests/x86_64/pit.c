/*
 * test=pit: the PC timer's interrupt through the I/O APIC, where the
 * firmware tables say it arrives. ISA IRQ 0 is the GSI of the MADT's
 * interrupt source override for IRQ 0 (GSI 2 on PCs: I/O APIC pin 2), or
 * GSI 0 without one. The test masks the 8259 PICs, routes that pin to a
 * vector on this CPU, runs PIT channel 0 as a 100 Hz rate generator and
 * waits, with interrupts on, for PIT_TICKS ticks (at most PIT_TIMEOUT s).
 *
 * On a timeout it listens on the other candidate pin (0 or 2) for a second,
 * so the FAIL line says where the ticks went instead. With an MP table as
 * well as a MADT, the MP table's IRQ 0 entry must name the same pin.
 */
#include "acpi.h"
#include "arch.h"
#include "idt.h"
#include "io.h"
#include "ioapic.h"
#include "layout.h"
#include "report.h"
#include "test.h"
#include "timeout.h"

#define PIT_HZ		1193182
#define PIT_RATE	100		/* Hz */
#define PIT_TICKS	3
#define PIT_TIMEOUT	5		/* seconds */
#define PIT_VECTOR	IRQ_VECTOR_BASE
#define PROBE_VECTOR	(IRQ_VECTOR_BASE + 1)

static volatile unsigned ticks, probe_ticks;

static void on_tick(unsigned vector)
{
	if (vector == PIT_VECTOR)
		ticks++;
	else
		probe_ticks++;
}

static void pit_periodic(unsigned hz)
{
	unsigned count = PIT_HZ / hz;

	outb(0x43, 0x34);		/* channel 0, lo/hi byte, mode 2, binary */
	outb(0x40, count & 0xff);
	outb(0x40, count >> 8);
}

/*
 * Mode 0 with the longest count: one more edge 55 ms later, then none. (A
 * control word alone does not stop the counter in QEMU's or KVM's 8254.)
 */
static void pit_stop(void)
{
	outb(0x43, 0x30);
	outb(0x40, 0);
	outb(0x40, 0);
}

/* Interrupts on until *count reaches want or the time is up. */
static void wait_ticks(volatile unsigned *count, unsigned want, unsigned seconds)
{
	struct timeout t;

	timeout_start(&t, seconds);
	__asm__ __volatile__("sti" ::: "memory");
	while (*count < want && !timeout_expired(&t))
		arch_cpu_relax();
	__asm__ __volatile__("cli" ::: "memory");
}

static const char *polarity(u16 flags)
{
	return INTI_POLARITY(flags) == 3 ? "low" : "high";
}

static const char *trigger(u16 flags)
{
	return INTI_TRIGGER(flags) == 3 ? "level" : "edge";
}

static void run_pit(void)
{
	struct isa_route r;
	const char *why;
	u8 mp_id;
	unsigned mp_pin, other;
	u32 dest = this_cpu()->apic_id;

	if (!ioapic_isa_route(0, &r, &why)) {
		report_fail("pit", "IRQ 0: %s", why);
		return;
	}
	info("pit", "irq 0 -> gsi %u (%s), %s %s -> ioapic %u at 0x%llx pin %u, vector 0x%x",
	     r.gsi, r.override ? "madt override" : "no override", trigger(r.flags),
	     polarity(r.flags), r.ioapic_id, (unsigned long long)r.ioapic, r.pin, PIT_VECTOR);
	if (mptable_isa_route(0, &mp_id, &mp_pin)) {
		info("pit", "mp table: irq 0 -> ioapic %u pin %u", mp_id, mp_pin);
		if (mp_id != r.ioapic_id || mp_pin != r.pin) {
			report_fail("pit", "the MP table routes IRQ 0 to ioapic %u pin %u, the MADT to "
				    "ioapic %u pin %u", mp_id, mp_pin, r.ioapic_id, r.pin);
			return;
		}
	}

	/* ISA IRQs must come only through the I/O APIC: mask both 8259s. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	ticks = probe_ticks = 0;
	idt_set_irq(PIT_VECTOR, on_tick);
	idt_set_irq(PROBE_VECTOR, on_tick);
	ioapic_route(r.ioapic, r.pin, PIT_VECTOR, r.flags, dest);
	pit_periodic(PIT_RATE);
	wait_ticks(&ticks, PIT_TICKS, PIT_TIMEOUT);
	ioapic_mask(r.ioapic, r.pin);

	if (ticks >= PIT_TICKS) {
		pit_stop();
		report_ok("pit", "(%u ticks of IRQ 0 through the I/O APIC)", PIT_TICKS);
		return;
	}
	/* Where did they go? Listen on the other pin PCs use for the PIT. */
	other = r.pin == 2 ? 0 : 2;
	if (other < ioapic_pins(r.ioapic)) {
		ioapic_route(r.ioapic, other, PROBE_VECTOR, r.flags, dest);
		wait_ticks(&probe_ticks, PIT_TICKS, 1);
		ioapic_mask(r.ioapic, other);
	}
	pit_stop();
	report_fail("pit", "%u of %u ticks on ioapic pin %u (gsi %u) in %u s; %u arrived on pin %u instead",
		    ticks, PIT_TICKS, r.pin, r.gsi, PIT_TIMEOUT, probe_ticks, other);
}
SELFTEST(pit, run_pit, "PIT channel 0 ticks through the I/O APIC pin the MADT names for IRQ 0");
