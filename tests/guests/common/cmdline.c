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
