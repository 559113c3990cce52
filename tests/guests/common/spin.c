/*
 * test=spin: keep every CPU busy and print a heartbeat about once a
 * second until the VMM powers the VM off or resets it.
 */
#include "arch.h"
#include "printf.h"
#include "report.h"
#include "test.h"

/* The platform's power button (x86_64/ged.c); without one, never pressed. */
bool arch_power_button(void) __attribute__((weak));

static void spin_forever(void)
{
	for (volatile u64 n = 0;; n++)
		;
}

static void run_spin(void)
{
	unsigned beat = 0;
	int last = arch_clock_seconds();

	if (last < 0) {
		report_fail("spin", "no clock to time the heartbeat");
		return;
	}
	info("spin", "%u other cpus spinning", arch_run_on_others(spin_forever));
	for (;;) {
		int s;

		for (volatile unsigned i = 0; i < 4096; i++)	/* burn cycles */
			;
		s = arch_clock_seconds();
		if (s >= 0 && s != last) {
			last = s;
			kprintf("selftest: heartbeat %u\n", ++beat);
		}
		if (arch_power_button && arch_power_button()) {
			info("spin", "power button pressed");
			return;
		}
	}
}
SELFTEST(spin, run_spin, "busy-loop all CPUs, heartbeat every second");
