/* The MC146818-compatible CMOS RTC at I/O ports 0x70/0x71. */
#include "arch.h"
#include "io.h"
#include "report.h"
#include "rtc.h"

#define CMOS_INDEX	0x70
#define CMOS_DATA	0x71
#define RTC_SEC		0x00
#define RTC_MIN		0x02
#define RTC_HOUR	0x04
#define RTC_DAY		0x07
#define RTC_MONTH	0x08
#define RTC_YEAR	0x09
#define RTC_REG_A	0x0a	/* bit 7: update in progress */
#define RTC_REG_B	0x0b	/* bit 2: binary, bit 1: 24-hour */
#define RTC_CENTURY	0x32	/* usual century register (FADT may say) */

struct rtc_time {
	unsigned sec, min, hour, day, month, year, century;
};

static u8 cmos_read(u8 reg)
{
	outb(CMOS_INDEX, reg);
	return inb(CMOS_DATA);
}

bool rtc_present(void)
{
	return cmos_read(RTC_REG_A) != 0xff || cmos_read(RTC_REG_B) != 0xff;
}

/* Wait (bounded) until no update is in progress: the fields are stable. */
static void wait_uip(void)
{
	for (unsigned i = 0; i < 10000 && (cmos_read(RTC_REG_A) & 0x80); i++)
		arch_cpu_relax();
}

static unsigned from_bcd(unsigned v, bool binary)
{
	return binary ? v : (v >> 4) * 10 + (v & 0xf);
}

int rtc_seconds(void)
{
	static int mode = -1;	/* -1 unknown, 0 absent, 1 BCD, 2 binary */

	if (mode < 0)
		mode = !rtc_present() ? 0 : cmos_read(RTC_REG_B) & 4 ? 2 : 1;
	if (!mode)
		return -1;
	wait_uip();
	return from_bcd(cmos_read(RTC_SEC), mode == 2);
}

static void read_raw(struct rtc_time *t, unsigned century_reg)
{
	wait_uip();
	t->sec = cmos_read(RTC_SEC);
	t->min = cmos_read(RTC_MIN);
	t->hour = cmos_read(RTC_HOUR);
	t->day = cmos_read(RTC_DAY);
	t->month = cmos_read(RTC_MONTH);
	t->year = cmos_read(RTC_YEAR);
	t->century = cmos_read(century_reg);
}

void rtc_check(unsigned century_reg, bool expected)
{
	struct rtc_time t, again;
	unsigned tries = 0;
	u8 b;
	bool binary, pm = false;

	if (!rtc_present()) {
		if (expected)
			report_fail("rtc", "no CMOS RTC (ports 0x70/0x71 read 0xff)");
		else
			report_skip("rtc", "no CMOS RTC, and none promised by the firmware");
		return;
	}
	if (!century_reg || century_reg > 0x7f)
		century_reg = RTC_CENTURY;
	/* Read until two reads agree, so no update slipped in between. */
	read_raw(&t, century_reg);
	do {
		again = t;
		read_raw(&t, century_reg);
	} while (++tries < 5 && (t.sec != again.sec || t.min != again.min ||
				 t.hour != again.hour || t.day != again.day));

	b = cmos_read(RTC_REG_B);
	binary = b & 0x04;
	if (!(b & 0x02)) {		/* 12-hour clock: bit 7 is PM */
		pm = t.hour & 0x80;
		t.hour &= 0x7f;
	}
	t.sec = from_bcd(t.sec, binary);
	t.min = from_bcd(t.min, binary);
	t.hour = from_bcd(t.hour, binary);
	t.day = from_bcd(t.day, binary);
	t.month = from_bcd(t.month, binary);
	t.year = from_bcd(t.year, binary);
	t.century = from_bcd(t.century, binary);
	if (!(b & 0x02))
		t.hour = t.hour % 12 + (pm ? 12 : 0);
	if (t.century < 19 || t.century > 21)
		t.century = 20;

	info("rtc", "%u%02u-%02u-%02u %02u:%02u:%02u (%s, %s)", t.century,
	     t.year, t.month, t.day, t.hour, t.min, t.sec,
	     binary ? "binary" : "bcd", b & 0x02 ? "24h" : "12h");
	if (t.sec > 59 || t.min > 59 || t.hour > 23 || t.day < 1 || t.day > 31 ||
	    t.month < 1 || t.month > 12 || t.year > 99)
		report_fail("rtc", "field out of range");
	else
		report_ok("rtc", NULL);
}
