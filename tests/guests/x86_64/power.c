/*
 * The end of a run: the status byte to I/O port 0xf4 (QEMU's
 * isa-debug-exit), then ACPI S5. If the VM is still running a few seconds
 * later, say so and halt with interrupts off.
 */
#include "acpi.h"
#include "arch.h"
#include "io.h"
#include "report.h"
#include "timeout.h"

#define DEBUG_EXIT_PORT 0xf4

__noreturn void arch_exit(int status)
{
	struct timeout t;

	outb(DEBUG_EXIT_PORT, status);
	acpi_poweroff();
	/* The VMM may act on the write asynchronously: give it time. */
	timeout_start(&t, 3);
	while (!timeout_expired(&t))
		arch_cpu_relax();
	report_fail("poweroff", "%s", acpi.have_fadt ? "still running after ACPI S5 request"
						     : "no ACPI FADT to power off with");
	for (;;)
		arch_cpu_halt();
}
