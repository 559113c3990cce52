/*
 * Exceptions end the run: "FAIL exception: <class> (esr ...) at pc ... on
 * cpu N" and the normal exit. test=fault checks that path with UDF.
 */
#include "arch.h"
#include "printf.h"
#include "report.h"
#include "test.h"

static const char *const kinds[16] = {
	"sync (el1t)", "irq (el1t)", "fiq (el1t)", "serror (el1t)",
	"sync", "irq", "fiq", "serror",
	"sync (el0)", "irq (el0)", "fiq (el0)", "serror (el0)",
	"sync (el0 aarch32)", "irq (el0 aarch32)", "fiq (el0 aarch32)", "serror (el0 aarch32)",
};

static const char *ec_name(u32 ec)
{
	switch (ec) {
	case 0x00: return "undefined instruction";
	case 0x15: return "svc";
	case 0x16: return "hvc";
	case 0x17: return "smc";
	case 0x20: case 0x21: return "instruction abort";
	case 0x22: return "pc alignment";
	case 0x24: case 0x25: return "data abort";
	case 0x26: return "sp alignment";
	case 0x3c: return "brk";
	default: return "exception";
	}
}

__noreturn void exception(u64 kind, u64 esr, u64 elr, u64 far, u64 spsr)
{
	u32 ec = (u32)(esr >> 26) & 0x3f;

	console_unlock_if_owner();
	report_fail("exception", "%s: %s (esr 0x%llx) at pc 0x%llx far 0x%llx spsr 0x%llx on cpu %u",
		    kinds[kind & 15], ec_name(ec), (unsigned long long)esr, (unsigned long long)elr,
		    (unsigned long long)far, (unsigned long long)spsr, arch_cpu_index());
	selftest_exit();
}

static void run_fault(void)
{
	info("fault", "executing udf #0: expect a FAIL exception line and a non-zero exit");
	__asm__ __volatile__("udf #0" ::: "memory");
	report_fail("fault", "udf did not trap");
}
SELFTEST(fault, run_fault, "executes UDF: an exception must surface as FAIL and a non-zero exit");
