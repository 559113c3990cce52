/*
 * test=fault: execute ud2 to check the exception path end to end. Expect
 * "FAIL exception: #UD ..." and a non-zero exit status.
 */
#include "report.h"
#include "test.h"

static void run_fault(void)
{
	info("fault", "executing ud2");
	__asm__ __volatile__("ud2");
	report_fail("fault", "ud2 did not trap");
}
SELFTEST(fault, run_fault, "raise #UD: the exception handler must report it");
