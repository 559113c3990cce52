#ifndef X86_64_CLOCK_H
#define X86_64_CLOCK_H

/*
 * Pick the clock behind arch_clock_seconds(): the CMOS RTC, else the TSC
 * with its frequency from CPUID or measured against PIT channel 2.
 */
void clock_init(void);

#endif
