/*
 * test=idle: say so, then halt every CPU with interrupts off, as a hung
 * guest would, until the VMM resets the VM (tests/integration/test_lifecycle.py:
 * the reset must start the halted boot CPU again).
 */
#include "arch.h"
#include "printf.h"
#include "test.h"

static void run_idle(void)
{
	kprintf("selftest: idle, halting\n");
	for (;;)
		arch_cpu_halt();
}
SELFTEST(idle, run_idle, "print a line, then halt with interrupts off until the VMM resets the VM");
