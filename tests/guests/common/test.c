#include "test.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"

/* Bounds of the .selftests section, from the linker script. */
extern const struct selftest_test __tests_start[], __tests_end[];

static void run_one(const char *name, size_t len)
{
	for (const struct selftest_test *t = __tests_start; t < __tests_end; t++) {
		if (strlen(t->name) == len && !strncmp(t->name, name, len)) {
			info("test", "%s (%s)", t->name, t->desc);
			t->run();
			return;
		}
	}

	char known[256];
	size_t n = 0;

	known[0] = 0;
	for (const struct selftest_test *t = __tests_start; t < __tests_end; t++)
		n += snprintf(known + n, n < sizeof(known) ? sizeof(known) - n : 0,
			      "%s%s", n ? " " : "", t->name);
	char what[64];

	snprintf(what, sizeof(what), "%.*s", (int)len, name);
	report_fail(what, "unknown test (known: %s)", known);
}

void tests_run(const char *cmdline)
{
	cmdline_for_each(cmdline, "test", run_one);
}
