#include "timeout.h"
#include "arch.h"

void timeout_start(struct timeout *t, unsigned seconds)
{
	t->last_sec = arch_clock_seconds();
	t->ticks = 0;
	/* The first tick may come at once: wait for one more. */
	t->seconds = seconds + 1;
	t->polls = 0;
	t->start = arch_cycles();
}

bool timeout_expired(struct timeout *t)
{
	int s;

	if (t->last_sec < 0)
		return arch_cycles() - t->start > ((u64)(t->seconds - 1) << 31);
	if (++t->polls & 63)	/* the clock is a slow I/O read */
		return false;
	s = arch_clock_seconds();
	if (s != t->last_sec) {
		t->last_sec = s;
		t->ticks++;
	}
	return t->ticks >= t->seconds;
}
