#include "report.h"
#include "arch.h"
#include "printf.h"

static unsigned failures;

static void line(const char *kind, const char *name, const char *sep,
		 const char *fmt, va_list ap)
{
	char msg[400];

	msg[0] = 0;
	if (fmt)
		vsnprintf(msg, sizeof(msg), fmt, ap);
	kprintf("selftest: %s %s%s%s\n", kind, name, msg[0] ? sep : "", msg);
}

void info(const char *what, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	line("info", what, ": ", fmt, ap);
	va_end(ap);
}

void report_ok(const char *name, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	line("ok", name, " ", fmt, ap);
	va_end(ap);
}

void report_fail(const char *name, const char *fmt, ...)
{
	va_list ap;

	__atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
	va_start(ap, fmt);
	line("FAIL", name, ": ", fmt, ap);
	va_end(ap);
}

void report_skip(const char *name, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	line("skip", name, ": ", fmt, ap);
	va_end(ap);
}

unsigned report_failures(void)
{
	return READ_ONCE(failures);
}

__noreturn void selftest_exit(void)
{
	static u32 exiting;
	unsigned n = report_failures();
	int status = n > 127 ? 127 : (int)n;

	/* Only the first CPU to get here reports; any other just stops. */
	if (__atomic_exchange_n(&exiting, 1, __ATOMIC_ACQ_REL))
		for (;;)
			arch_cpu_halt();
	kprintf("selftest: exit %d\n", status);
	arch_exit(status);
}
