#include "cmdline.h"
#include "string.h"

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

const char *cmdline_value(const char *cmdline, const char *key, unsigned n,
			  size_t *len)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while (*p) {
		const char *w;

		while (is_space(*p))
			p++;
		for (w = p; *p && !is_space(*p); p++)
			;
		if ((size_t)(p - w) > klen && !strncmp(w, key, klen) &&
		    w[klen] == '=' && n-- == 0) {
			*len = p - w - klen - 1;
			return w + klen + 1;
		}
	}
	return NULL;
}

void cmdline_for_each(const char *cmdline, const char *key,
		      void (*fn)(const char *item, size_t len))
{
	const char *v;
	size_t len;

	for (unsigned n = 0; (v = cmdline_value(cmdline, key, n, &len)); n++) {
		while (len) {
			size_t i = 0;

			while (i < len && v[i] != ',')
				i++;
			if (i)
				fn(v, i);
			v += i;
			len -= i;
			if (len) {	/* skip the comma */
				v++;
				len--;
			}
		}
	}
}

bool cmdline_parse_u64(const char **p, const char *end, u64 *out, bool suffix)
{
	const char *s = *p, *digits;
	unsigned base = 10;
	u64 v = 0;

	if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (digits = s; s < end; s++) {
		unsigned c = (u8)*s, dig;

		if (c >= '0' && c <= '9')
			dig = c - '0';
		else if (base == 16 && (c | 0x20) >= 'a' && (c | 0x20) <= 'f')
			dig = (c | 0x20) - 'a' + 10;
		else
			break;
		v = v * base + dig;
	}
	if (s == digits)
		return false;
	if (suffix && s < end) {
		switch (*s | 0x20) {
		case 'g': v <<= 10;	/* fall through */
		case 'm': v <<= 10;	/* fall through */
		case 'k': v <<= 10; s++; break;
		}
	}
	*p = s;
	*out = v;
	return true;
}
