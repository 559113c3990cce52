#ifndef X86_64_RTC_H
#define X86_64_RTC_H

#include "types.h"

bool rtc_present(void);
/* The seconds field, or -1 without an RTC. */
int rtc_seconds(void);
/*
 * Read the CMOS RTC, print the date, report "ok rtc"; a missing RTC is a
 * FAIL if expected, else a skip.
 */
void rtc_check(unsigned century_reg, bool expected);

#endif
