/*
 * Bounded waiting without a calibrated timer: count changes of the wall
 * clock's seconds field (polled sparingly), or, with no clock, cycles
 * (2^31 per "second": 0.5-2 s on current CPUs).
 */
#ifndef COMMON_TIMEOUT_H
#define COMMON_TIMEOUT_H

#include "types.h"

struct timeout {
	int last_sec;		/* -1: no clock, use cycles */
	unsigned ticks, seconds, polls;
	u64 start;
};

void timeout_start(struct timeout *t, unsigned seconds);
/* Call in the poll loop; true once at least `seconds` have passed. */
bool timeout_expired(struct timeout *t);

#endif
