/* Seconds for timeouts and heartbeats: CMOS RTC, else a calibrated TSC. */
#include "arch.h"
#include "clock.h"
#include "io.h"
#include "report.h"
#include "rtc.h"

static u64 tsc_hz;
static bool use_rtc, ready;

/* TSC frequency from CPUID: hypervisor timing leaf, or leaf 0x15. */
static u64 cpuid_tsc_hz(void)
{
	u32 r[4];

	cpuid(0x40000000, 0, r);
	if (r[0] >= 0x40000010 && r[0] < 0x40010000) {
		cpuid(0x40000010, 0, r);
		if (r[0])
			return (u64)r[0] * 1000;
	}
	cpuid(0, 0, r);
	if (r[0] >= 0x15) {
		cpuid(0x15, 0, r);
		if (r[0] && r[1] && r[2])
			return (u64)r[2] * r[1] / r[0];
	}
	return 0;
}

#define PIT_HZ 1193182

static u16 pit_count0(void)
{
	u8 lo;

	outb(0x43, 0x00);			/* latch channel 0 */
	lo = inb(0x40);
	return lo | inb(0x40) << 8;
}

/*
 * Count TSC cycles over 20 ms of PIT channel 0, read back by latching (no
 * need for the port 0x61 gate). Interrupts stay off: IRQ 0 is never seen.
 */
static u64 pit_tsc_hz_once(void)
{
	u16 c0, c;
	u64 t0, t;

	outb(0x43, 0x30);			/* channel 0, lo/hi, mode 0 */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	c0 = pit_count0();
	t0 = arch_cycles();
	if (c0 < 0xc000)			/* not freshly loaded */
		return 0;
	for (;;) {
		c = pit_count0();
		t = arch_cycles();
		if (c > c0)			/* wrapped: we were away too long */
			return 0;
		if (c0 - c >= PIT_HZ / 50)
			break;
		if (t - t0 > (c == c0 ? 1ull << 28 : 1ull << 34))
			return 0;		/* not counting */
	}
	return (t - t0) * PIT_HZ / (c0 - c);
}

/*
 * A vCPU preempted at the wrong moment spoils a measurement: take the
 * median of three good ones, out of at most six tries.
 */
static u64 pit_tsc_hz(void)
{
	u64 m[3], t;
	unsigned n = 0;

	for (unsigned i = 0; i < 6 && n < 3; i++) {
		m[n] = pit_tsc_hz_once();
		if (m[n])
			n++;
		else if (i == 0 && inb(0x40) == 0xff && inb(0x40) == 0xff)
			return 0;		/* nothing at the PIT ports */
	}
	if (n < 3)
		return n ? m[0] : 0;
	if (m[0] > m[1])
		t = m[0], m[0] = m[1], m[1] = t;
	if (m[1] > m[2])
		t = m[1], m[1] = m[2], m[2] = t;
	return m[0] > m[1] ? m[0] : m[1];
}

void clock_init(void)
{
	const char *how = "cpuid";

	ready = true;
	use_rtc = rtc_present();
	if (use_rtc) {
		info("clock", "cmos rtc");
		return;
	}
	tsc_hz = cpuid_tsc_hz();
	if (!tsc_hz) {
		tsc_hz = pit_tsc_hz();
		how = "pit";
	}
	if (!tsc_hz) {
		info("clock", "none (no RTC, TSC frequency unknown, no PIT)");
		return;
	}
	if (tsc_hz < 100000000 || tsc_hz > 20000000000ull) {
		info("clock", "none (tsc %llu Hz from %s is implausible)",
		     (unsigned long long)tsc_hz, how);
		tsc_hz = 0;
		return;
	}
	info("clock", "tsc %llu kHz (from %s)", (unsigned long long)tsc_hz / 1000, how);
}

int arch_clock_seconds(void)
{
	if (!ready)
		clock_init();
	if (use_rtc)
		return rtc_seconds();
	if (tsc_hz)
		return arch_cycles() / tsc_hz % 60;
	return -1;
}
