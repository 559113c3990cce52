/*
 * Application processor start-up: INIT-SIPI-SIPI through the local APIC,
 * one AP at a time. Each AP reports "cpu <apic-id> online", then waits
 * halted for work (arch_run_on_others) with interrupts on.
 */
#include "apic.h"
#include "arch.h"
#include "idt.h"
#include "printf.h"
#include "report.h"
#include "smp.h"
#include "string.h"
#include "timeout.h"

extern const u8 ap_trampoline[], ap_trampoline_end[];
extern u8 stacks[];

u64 ap_stack_top;		/* read by ap_start64 (entry.S) */
static u32 ap_index, ap_ack;
static unsigned nr_online = 1;
static void (*work)(void);
static u32 work_gen;

static __noreturn void ap_idle(u32 seen)
{
	for (;;) {
		u32 gen = __atomic_load_n(&work_gen, __ATOMIC_ACQUIRE);

		if (gen != seen) {
			seen = gen;
			READ_ONCE(work)();
			continue;
		}
		/* sti's shadow makes "sti; hlt" atomic: no lost wake-up. */
		__asm__ __volatile__("sti; hlt; cli" ::: "memory");
	}
}

__noreturn void ap_main(void)
{
	struct percpu *p = this_cpu();

	p->index = READ_ONCE(ap_index);
	idt_load();
	apic_enable();
	p->apic_id = apic_id();
	kprintf("selftest: cpu %u online\n", p->apic_id);
	u32 gen = __atomic_load_n(&work_gen, __ATOMIC_ACQUIRE);
	__atomic_store_n(&ap_ack, 1, __ATOMIC_RELEASE);
	ap_idle(gen);
}

unsigned arch_run_on_others(void (*fn)(void))
{
	WRITE_ONCE(work, fn);
	__atomic_fetch_add(&work_gen, 1, __ATOMIC_RELEASE);
	if (nr_online > 1)
		apic_send_others(WAKEUP_VECTOR);
	return nr_online - 1;
}

static bool wait_ack(unsigned seconds, unsigned max_polls)
{
	struct timeout t;

	timeout_start(&t, seconds);
	for (unsigned i = 0; !max_polls || i < max_polls; i++) {
		if (__atomic_load_n(&ap_ack, __ATOMIC_ACQUIRE))
			return true;
		if (timeout_expired(&t))
			break;
		arch_cpu_relax();
	}
	return __atomic_load_n(&ap_ack, __ATOMIC_ACQUIRE);
}

static bool start_ap(u32 id)
{
	u8 vector = TRAMPOLINE_ADDR >> 12;

	WRITE_ONCE(ap_index, nr_online);
	WRITE_ONCE(ap_stack_top, (uintptr_t)stacks + (nr_online + 1) * STACK_SIZE);
	__atomic_store_n(&ap_ack, 0, __ATOMIC_RELEASE);

	if (id > 0xfe && !apic_x2apic()) {
		report_fail("smp", "apic id %u is out of reach in xAPIC mode", id);
		return false;
	}
	if (!apic_send_init(id) || !apic_send_sipi(id, vector)) {
		report_fail("smp", "IPI to apic id %u not delivered", id);
		return false;
	}
	/* The second SIPI only if the first seems lost (it is ignored by a running AP). */
	if (!wait_ack(1, 2000))
		apic_send_sipi(id, vector);
	if (!wait_ack(2, 0)) {
		report_fail("smp", "cpu %u did not come online", id);
		return false;
	}
	nr_online++;
	return true;
}

void smp_boot(const struct bootinfo *bi, const u32 *ids, unsigned n)
{
	u32 self = this_cpu()->apic_id;
	bool listed = false;

	for (unsigned i = 0; i < n; i++)
		listed |= ids[i] == self;
	if (!listed) {
		report_fail("smp", "boot cpu (apic id %u) is not in the firmware tables", self);
		return;
	}
	if (n > 1 && bi->nr_memmap &&
	    !memmap_is_ram(bi, TRAMPOLINE_ADDR, TRAMPOLINE_ADDR + 0x1000)) {
		report_fail("smp", "trampoline page 0x%x is not RAM in the memory map",
			    TRAMPOLINE_ADDR);
		return;
	}
	memcpy(phys(TRAMPOLINE_ADDR), ap_trampoline, ap_trampoline_end - ap_trampoline);
	for (unsigned i = 0; i < n; i++) {
		if (ids[i] == self)
			continue;
		if (nr_online == MAX_CPUS) {
			report_fail("smp", "more than %u cpus", MAX_CPUS);
			break;
		}
		if (!start_ap(ids[i]))
			break;
	}
	if (nr_online == n)
		report_ok("smp", "(%u/%u cpus online)", nr_online, n);
	else
		report_fail("smp", "%u/%u cpus online", nr_online, n);
}
