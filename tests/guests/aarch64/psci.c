/*
 * PSCI and secondary CPUs. Each secondary is started with CPU_ON, reports
 * "cpu <affinity> online" and turns itself off again (CPU_OFF), so idle CPUs
 * cost the VMM nothing; arch_run_on_others() starts them again with work.
 */
#include "arch.h"
#include "fdt.h"
#include "printf.h"
#include "psci.h"
#include "report.h"
#include "timeout.h"

extern char secondary_entry[];

static u32 ack[MAX_CPUS];
static bool online[MAX_CPUS];
static unsigned nr_online = 1;
static void (*work)(void);

long psci_call(u32 fn, u64 a1, u64 a2, u64 a3)
{
	register u64 x0 __asm__("x0") = fn;
	register u64 x1 __asm__("x1") = a1;
	register u64 x2 __asm__("x2") = a2;
	register u64 x3 __asm__("x3") = a3;

	if (plat.psci_smc)
		__asm__ __volatile__("smc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) ::
				     "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12",
				     "x13", "x14", "x15", "x16", "x17", "memory");
	else
		__asm__ __volatile__("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) ::
				     "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12",
				     "x13", "x14", "x15", "x16", "x17", "memory");
	return (long)x0;
}

void psci_check(void)
{
	long version, features;

	if (!plat.psci) {
		report_fail("psci", "no /psci node in the device tree");
		return;
	}
	version = psci_call(PSCI_VERSION, 0, 0, 0);
	info("psci", "%s via %s, version %ld.%ld", plat.psci_compatible, plat.psci_smc ? "smc" : "hvc",
	     version >> 16, version & 0xffff);
	if (version < 2) {	/* 0.2 is the first version with CPU_ON/SYSTEM_OFF ids */
		report_fail("psci", "version 0x%lx is older than 0.2", version);
		return;
	}
	if (version >= 0x10000) {
		features = psci_call(PSCI_FEATURES, PSCI_CPU_ON, 0, 0);
		if (features != PSCI_SUCCESS) {
			report_fail("psci", "PSCI_FEATURES(CPU_ON) = %ld", features);
			return;
		}
		features = psci_call(PSCI_FEATURES, 0x8400ffffu, 0, 0);
		if (features != PSCI_NOT_SUPPORTED) {
			report_fail("psci", "PSCI_FEATURES(an unknown id) = %ld, not NOT_SUPPORTED", features);
			return;
		}
	}
	report_ok("psci", NULL);
}

static u64 my_affinity(void)
{
	return sysreg_read(mpidr_el1) & 0xff00ffffffull;
}

/* C entry of a secondary CPU (entry.S): ctx = index | CTX_*. */
__noreturn void secondary_main(u64 ctx)
{
	unsigned i = ctx & 0xff;

	if (ctx & CTX_WORK) {
		READ_ONCE(work)();
	} else {
		kprintf("selftest: cpu %llu online\n", (unsigned long long)my_affinity());
		__atomic_store_n(&ack[i], 1, __ATOMIC_RELEASE);
	}
	psci_call(PSCI_CPU_OFF, 0, 0, 0);
	for (;;)	/* CPU_OFF does not return; if it does, stay quiet */
		arch_cpu_halt();
}

static bool wait_until(bool (*done)(unsigned), unsigned i, unsigned seconds)
{
	struct timeout t;

	timeout_start(&t, seconds);
	while (!done(i)) {
		if (timeout_expired(&t))
			return done(i);
		arch_cpu_relax();
	}
	return true;
}

static bool acked(unsigned i) { return __atomic_load_n(&ack[i], __ATOMIC_ACQUIRE); }

static bool is_off(unsigned i)
{
	return psci_call(PSCI_AFFINITY_INFO, plat.cpu_mpidr[i], 0, 0) == AFFINITY_OFF;
}

void smp_boot(void)
{
	u64 self = my_affinity();
	unsigned n = plat.nr_cpus < MAX_CPUS ? plat.nr_cpus : MAX_CPUS;
	unsigned index = 1;
	bool listed = false;

	for (unsigned c = 0; c < n; c++)
		listed |= (plat.cpu_mpidr[c] & 0xff00ffffffull) == self;
	if (!listed) {
		report_fail("smp", "boot cpu (mpidr 0x%llx) is not in the device tree",
			    (unsigned long long)self);
		return;
	}
	if (plat.nr_cpus > MAX_CPUS)
		report_fail("smp", "%u cpus, more than the %u this kernel supports", plat.nr_cpus, MAX_CPUS);
	for (unsigned c = 0; c < n; c++) {
		long ret;

		if ((plat.cpu_mpidr[c] & 0xff00ffffffull) == self)
			continue;
		ret = psci_call(PSCI_CPU_ON, plat.cpu_mpidr[c], (u64)(uintptr_t)secondary_entry,
				index | CTX_START);
		if (ret != PSCI_SUCCESS) {
			report_fail("smp", "CPU_ON(0x%llx) = %ld", (unsigned long long)plat.cpu_mpidr[c], ret);
			break;
		}
		if (!wait_until(acked, index, 2)) {
			report_fail("smp", "cpu 0x%llx did not come online", (unsigned long long)plat.cpu_mpidr[c]);
			break;
		}
		online[c] = true;
		nr_online++;
		if (!wait_until(is_off, c, 2))
			report_fail("smp", "cpu 0x%llx is not OFF after CPU_OFF (AFFINITY_INFO)",
				    (unsigned long long)plat.cpu_mpidr[c]);
		index++;
	}
	if (nr_online == plat.nr_cpus)
		report_ok("smp", "(%u/%u cpus online)", nr_online, plat.nr_cpus);
	else
		report_fail("smp", "%u/%u cpus online", nr_online, plat.nr_cpus);
}

unsigned arch_run_on_others(void (*fn)(void))
{
	unsigned asked = 0, index = 1;

	WRITE_ONCE(work, fn);
	for (unsigned c = 0; c < plat.nr_cpus && c < MAX_CPUS; c++) {
		if (!online[c])
			continue;
		wait_until(is_off, c, 1);
		if (psci_call(PSCI_CPU_ON, plat.cpu_mpidr[c], (u64)(uintptr_t)secondary_entry,
			      index | CTX_WORK) == PSCI_SUCCESS)
			asked++;
		index++;
	}
	return asked;
}
