/* Kernel command line: space-separated words, "key=value" or bare. */
#ifndef COMMON_CMDLINE_H
#define COMMON_CMDLINE_H

#include "types.h"

/*
 * Find the n-th word "key=value" and return a pointer to its value (not
 * NUL-terminated: *len receives its length), or NULL.
 */
const char *cmdline_value(const char *cmdline, const char *key, unsigned n,
			  size_t *len);

/* Call fn(item, len) for each comma-separated item of every "key=" word. */
void cmdline_for_each(const char *cmdline, const char *key,
		      void (*fn)(const char *item, size_t len));

/*
 * Parse a number at *p (before end) the way Linux's memparse() does: 0x hex
 * or decimal, then (if suffix) an optional K, M or G. Advances *p.
 */
bool cmdline_parse_u64(const char **p, const char *end, u64 *out, bool suffix);

#endif
