/* x86-64 start-up (arch_main, called from entry.S) and the default checks. */
#include "acpi.h"
#include "apic.h"
#include "arch.h"
#include "boot.h"
#include "clock.h"
#include "idt.h"
#include "mptable.h"
#include "printf.h"
#include "report.h"
#include "rtc.h"
#include "serial.h"
#include "smp.h"

static struct bootinfo bootinfo;

__noreturn void arch_main(void)
{
	this_cpu()->index = 0;
	this_cpu()->apic_id = 0;
	serial_init();
	idt_init();
	idt_load();
	boot_parse(&bootinfo);
	selftest_main(&bootinfo);
}

void arch_checks(const struct bootinfo *bi)
{
	static u32 ids[ACPI_MAX_CPUS];
	const u32 *cpu_ids = acpi.cpu_ids;
	unsigned n;

	acpi_init(bi->rsdp);
	clock_init();
	apic_init(acpi.lapic_addr);
	apic_enable();
	this_cpu()->apic_id = apic_id();
	info("apic", "%s at 0x%llx, boot cpu apic id %u",
	     apic_x2apic() ? "x2apic" : "xapic",
	     (unsigned long long)apic_base(), this_cpu()->apic_id);

	n = acpi.nr_cpus;
	if (!acpi.have_madt) {
		n = mptable_cpus(ids, ARRAY_SIZE(ids));
		cpu_ids = ids;
		if (n)
			info("cpus", "from the MP table (no ACPI MADT)");
	}
	if (!n) {
		report_fail("cpus", "no ACPI MADT or MP table: assuming 1");
		ids[0] = this_cpu()->apic_id;
		cpu_ids = ids;
		n = 1;
	}
	kprintf("selftest: cpus: %u\n", n);
	kprintf("selftest: cpu %u online\n", this_cpu()->apic_id);
	smp_boot(bi, cpu_ids, n < ACPI_MAX_CPUS ? n : ACPI_MAX_CPUS);

	/* A legacy (not HW-reduced) FADT promises an RTC unless it says otherwise. */
	rtc_check(acpi.century, acpi.have_fadt && !acpi.hw_reduced &&
				!(acpi.boot_arch & ACPI_BOOT_ARCH_NO_CMOS_RTC));
}
