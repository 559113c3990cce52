/*
 * The line format. Every line starts "selftest: ".
 *   selftest: ok <name>[ <detail>]        a check passed      (stable)
 *   selftest: FAIL <name>: <reason>       a check failed      (stable prefix)
 *   selftest: skip <name>: <reason>       nothing to check    (stable prefix)
 *   selftest: info <what>: <text>         differs between VMMs (ignore)
 * plus the fixed lines banner, "cmdline:", "cpus:", "cpu N online",
 * "heartbeat N" and "exit N" (see README.md).
 */
#ifndef COMMON_REPORT_H
#define COMMON_REPORT_H

#include "types.h"

void info(const char *what, const char *fmt, ...) __printf(2, 3);
void report_ok(const char *name, const char *fmt, ...) __printf(2, 3);
void report_fail(const char *name, const char *fmt, ...) __printf(2, 3);
void report_skip(const char *name, const char *fmt, ...) __printf(2, 3);
unsigned report_failures(void);

/* Print "selftest: exit <status>" and hand over to arch_exit(). */
__noreturn void selftest_exit(void);

#endif
