/* A small vsnprintf and the console lock that keeps lines whole across CPUs. */
#include "printf.h"
#include "arch.h"
#include "spinlock.h"
#include "string.h"

struct out {
	char *buf;
	size_t size, len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, u64 v, unsigned base, bool upper,
		    bool neg, int width, bool zero, bool left)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0, pad;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	pad = width - n - neg;
	if (!left && !zero)
		for (; pad > 0; pad--)
			put(o, ' ');
	if (neg)
		put(o, '-');
	if (!left && zero)
		for (; pad > 0; pad--)
			put(o, '0');
	while (n)
		put(o, tmp[--n]);
	for (; left && pad > 0; pad--)
		put(o, ' ');
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	for (; *fmt; fmt++) {
		bool zero = false, left = false, upper = false;
		int width = 0, prec = -1, lng = 0;
		u64 v;

		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		for (fmt++; *fmt == '0' || *fmt == '-'; fmt++)
			*fmt == '0' ? (zero = true) : (left = true);
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		}
		for (; *fmt >= '0' && *fmt <= '9'; fmt++)
			width = width * 10 + (*fmt - '0');
		if (*fmt == '.') {
			prec = 0;
			if (*++fmt == '*') {
				prec = va_arg(ap, int);
				fmt++;
			}
			for (; *fmt >= '0' && *fmt <= '9'; fmt++)
				prec = prec * 10 + (*fmt - '0');
		}
		for (; *fmt == 'l' || *fmt == 'z'; fmt++)
			lng++;

		switch (*fmt) {
		case 'd':
		case 'i': {
			s64 s = lng ? va_arg(ap, s64) : va_arg(ap, int);
			put_num(&o, s < 0 ? -(u64)s : (u64)s, 10, false, s < 0,
				width, zero, left);
			break;
		}
		case 'u':
			v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned int);
			put_num(&o, v, 10, false, false, width, zero, left);
			break;
		case 'X':
			upper = true;
			/* fall through */
		case 'x':
			v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned int);
			put_num(&o, v, 16, upper, false, width, zero, left);
			break;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_num(&o, (uintptr_t)va_arg(ap, void *), 16, false,
				false, width, zero, left);
			break;
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			int n, pad;

			if (!s)
				s = "(null)";
			n = strnlen(s, prec < 0 ? (size_t)-1 : (size_t)prec);
			pad = width - n;
			for (; !left && pad > 0; pad--)
				put(&o, ' ');
			while (n--)
				put(&o, *s++);
			for (; left && pad > 0; pad--)
				put(&o, ' ');
			break;
		}
		case '%':
			put(&o, '%');
			break;
		case 0:
			fmt--;
			break;
		default:
			put(&o, '%');
			put(&o, *fmt);
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

static struct spinlock console_lock;

void console_write(const char *s, size_t n)
{
	spin_lock(&console_lock);
	while (n--)
		arch_putc(*s++);
	spin_unlock(&console_lock);
}

void console_unlock_if_owner(void)
{
	spin_unlock_if_owner(&console_lock);
}

void vkprintf(const char *fmt, va_list ap)
{
	char line[512];
	int n = vsnprintf(line, sizeof(line), fmt, ap);

	if (n >= (int)sizeof(line)) {	/* keep the line terminated */
		n = sizeof(line) - 1;
		line[n - 1] = '\n';
	}
	console_write(line, n);
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vkprintf(fmt, ap);
	va_end(ap);
}
