/*
 * Tests selected with "test=<name>[,<name>...]" on the command line.
 * Any file can add one; the linker collects them into a table:
 *
 *	static void run_blk(void) { ... report_ok("blk", NULL); }
 *	SELFTEST(blk, run_blk, "virtio-blk read/write");
 */
#ifndef COMMON_TEST_H
#define COMMON_TEST_H

#include "types.h"

struct selftest_test {
	const char *name;
	void (*run)(void);
	const char *desc;
};

#define SELFTEST(name_, fn_, desc_)					\
	static const struct selftest_test __selftest_##name_		\
	__attribute__((used, section(".selftests"), aligned(8))) =	\
		{ #name_, fn_, desc_ }

/* Run every test named on the command line, in order. */
void tests_run(const char *cmdline);

#endif
