/* AArch64 start-up (arch_main, from entry.S), the default checks, console, clock, exit. */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "fdt.h"
#include "printf.h"
#include "psci.h"
#include "report.h"
#include "string.h"
#include "timeout.h"

#define UART_FALLBACK	0x09000000	/* QEMU virt's and vmmkit's PL011 */
#define PL011_DR	0x00
#define PL011_FR	0x18
#define PL011_FR_TXFF	(1u << 5)
#define PL031_DR	0x00

static struct bootinfo bootinfo;
static u64 uart = UART_FALLBACK;
static u64 counter_hz;

void arch_putc(char c)
{
	for (unsigned i = 0; i < 100000 && (mmio_read32(uart + PL011_FR) & PL011_FR_TXFF); i++)
		arch_cpu_relax();
	mmio_write32(uart + PL011_DR, (u8)c);
}

bool arch_map_mmio(u64 addr, u64 size)
{
	/* The identity map's Device-memory gigabyte (entry.S). */
	return addr + size <= (1ull << 30) && addr + size >= addr;
}

/* Seconds from the generic timer (cheap, present everywhere), else -1. */
int arch_clock_seconds(void)
{
	if (!counter_hz)
		counter_hz = sysreg_read(cntfrq_el0);
	if (!counter_hz)
		return -1;
	return (int)(arch_cycles() / counter_hz % 60);
}

__noreturn void arch_main(u64 dtb)
{
	const char *err = fdt_parse(dtb, &bootinfo);

	bootinfo.method = "arm64-image";
	if (err) {
		bootinfo.error = err;
	} else if (plat.uart) {
		uart = plat.uart;
	}
	snprintf(bootinfo.detail, sizeof(bootinfo.detail), "(dtb 0x%llx, %u bytes, el%llu)",
		 (unsigned long long)dtb, plat.fdt_size,
		 (unsigned long long)(sysreg_read(CurrentEL) >> 2 & 3));
	selftest_main(&bootinfo);
}

static void days_to_date(u64 days, unsigned *y, unsigned *m, unsigned *d)
{
	/* Howard Hinnant's civil_from_days. */
	u64 z = days + 719468, era = z / 146097, doe = z - era * 146097;
	u64 yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	u64 doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;

	*d = (unsigned)(doy - (153 * mp + 2) / 5 + 1);
	*m = (unsigned)(mp < 10 ? mp + 3 : mp - 9);
	*y = (unsigned)(yoe + era * 400 + (*m <= 2));
}

static void rtc_check(void)
{
	u32 t;
	unsigned y, mo, d;

	if (!plat.rtc) {
		report_skip("rtc", "no PL031 in the device tree");
		return;
	}
	t = mmio_read32(plat.rtc + PL031_DR);
	days_to_date(t / 86400, &y, &mo, &d);
	info("rtc", "%04u-%02u-%02u %02u:%02u:%02u (pl031 at 0x%llx)", y, mo, d, t / 3600 % 24,
	     t / 60 % 60, t % 60, (unsigned long long)plat.rtc);
	if (y < 2020 || y > 2200)
		report_fail("rtc", "implausible date %04u-%02u-%02u", y, mo, d);
	else
		report_ok("rtc", NULL);
}

void arch_checks(const struct bootinfo *bi)
{
	u64 self = sysreg_read(mpidr_el1) & 0xff00ffffffull;

	(void)bi;
	info("fdt", "%u cpus (%s), psci %s, pl011 0x%llx, pl031 0x%llx, %u virtio-mmio, gic%s, timer %s",
	     plat.nr_cpus, plat.cpu_enable_method[0] ? plat.cpu_enable_method : "no enable-method",
	     plat.psci ? (plat.psci_smc ? "smc" : "hvc") : "none", (unsigned long long)plat.uart,
	     (unsigned long long)plat.rtc, plat.nr_virtio, plat.gic_v3 ? "v3" : " (not v3)",
	     plat.timer ? "yes" : "no");
	if (plat.pci_ecam)
		info("fdt", "pci ecam 0x%llx (%llu MiB), 32-bit window 0x%llx (%llu MiB)",
		     (unsigned long long)plat.pci_ecam, (unsigned long long)plat.pci_ecam_size >> 20,
		     (unsigned long long)plat.pci_mem32, (unsigned long long)plat.pci_mem32_size >> 20);
	if (plat.initrd_end > plat.initrd_start)
		info("initrd", "[0x%llx-0x%llx)", (unsigned long long)plat.initrd_start,
		     (unsigned long long)plat.initrd_end);
	if (bootinfo.error)
		;	/* already reported by the common code as FAIL boot */
	else if (!plat.nr_cpus)
		report_fail("fdt", "no cpu nodes");
	else if (!plat.uart)
		report_fail("fdt", "no PL011 (\"arm,pl011\")");
	else
		report_ok("fdt", NULL);

	counter_hz = sysreg_read(cntfrq_el0);
	info("clock", "generic timer, cntfrq %llu kHz", (unsigned long long)counter_hz / 1000);
	info("cpu", "boot cpu mpidr 0x%llx, midr 0x%llx", (unsigned long long)sysreg_read(mpidr_el1),
	     (unsigned long long)sysreg_read(midr_el1));

	psci_check();
	kprintf("selftest: cpus: %u\n", plat.nr_cpus ? plat.nr_cpus : 1);
	kprintf("selftest: cpu %llu online\n", (unsigned long long)self);
	if (plat.psci && plat.nr_cpus > 1)
		smp_boot();
	else if (plat.nr_cpus <= 1)
		report_ok("smp", "(1/1 cpus online)");
	else
		report_fail("smp", "no PSCI to start the other cpus with");
	rtc_check();
}

__noreturn void arch_exit(int status)
{
	struct timeout t;

	if (plat.debug_exit)
		mmio_write32(plat.debug_exit, (u32)status);
	if (plat.psci)
		psci_call(PSCI_SYSTEM_OFF, 0, 0, 0);
	timeout_start(&t, 3);
	while (!timeout_expired(&t))
		arch_cpu_relax();
	report_fail("poweroff", "%s", plat.psci ? "still running after PSCI SYSTEM_OFF"
						: "no PSCI to power off with");
	for (;;)
		arch_cpu_halt();
}
