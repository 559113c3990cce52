/* printf-style formatting and the serialised line output of the selftest. */
#ifndef COMMON_PRINTF_H
#define COMMON_PRINTF_H

#include "types.h"

/*
 * Supported: %d %i %u %x %X %p %s %c %%, flags '-' and '0', a width
 * (number or '*'), a precision for %s (".N" or ".*"), and the length
 * modifiers l, ll, z.
 */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);

/* Format into a line buffer and write it to the console atomically. */
void kprintf(const char *fmt, ...) __printf(1, 2);
void vkprintf(const char *fmt, va_list ap);

/* Write raw bytes to the console under the console lock. */
void console_write(const char *s, size_t n);
/* Release the console lock if this CPU holds it (exception path). */
void console_unlock_if_owner(void);

#endif
