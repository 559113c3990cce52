"""The CMOS RTC against the host clock, as Linux's mc146818 code reads and sets it."""

from __future__ import annotations

import calendar
import datetime
import time

import pytest
from devices_support import FakeContext, RecordingLine, wait_for
from vmmkit_devices.legacy.rtc import CmosRtc, CmosRtcType

from vmmkit.device import DeviceRequest

SECONDS, MINUTES, HOURS, WDAY, MDAY, MONTH, YEAR, CENTURY = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
UIP, SET, DM_BINARY, H24, UIE = 0x80, 0x80, 0x04, 0x02, 0x10


class FakeClock:
    def __init__(self, when: datetime.datetime, fraction: float = 0.5) -> None:
        self.now = calendar.timegm(when.timetuple()) + fraction

    def __call__(self) -> float:
        return self.now


def cmos_read(rtc: CmosRtc, index: int) -> int:
    rtc.write(0, bytes((index,)))
    return rtc.read(1, 1)[0]


def cmos_write(rtc: CmosRtc, index: int, value: int) -> None:
    rtc.write(0, bytes((index,)))
    rtc.write(1, bytes((value,)))


def bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def linux_get_time(rtc: CmosRtc) -> datetime.datetime:
    """mc146818_get_time(): skip UIP, read, re-check the seconds; BCD unless DM says binary."""
    for _ in range(10_000):
        seconds = cmos_read(rtc, SECONDS)
        if cmos_read(rtc, REG_A) & UIP:
            time.sleep(0.0005)
            continue
        values = [cmos_read(rtc, r) for r in (SECONDS, MINUTES, HOURS, MDAY, MONTH, YEAR, CENTURY)]
        control = cmos_read(rtc, REG_B)
        if seconds != cmos_read(rtc, SECONDS):
            continue
        if not control & DM_BINARY:
            values = [from_bcd(v) for v in values]
        sec, minute, hour, mday, mon, year, century = values
        return datetime.datetime(century * 100 + year, mon, mday, hour, minute, sec)
    raise AssertionError("UIP never cleared")


WHEN = datetime.datetime(2024, 2, 29, 23, 59, 58)  # a Thursday


def test_registers_follow_the_host_clock_in_bcd() -> None:
    rtc = CmosRtc("rtc", clock=FakeClock(WHEN))
    assert cmos_read(rtc, REG_B) == H24  # 24 h, BCD
    assert cmos_read(rtc, SECONDS) == 0x58
    assert cmos_read(rtc, MINUTES) == 0x59
    assert cmos_read(rtc, HOURS) == 0x23
    assert cmos_read(rtc, WDAY) == 5  # Sunday = 1
    assert cmos_read(rtc, MDAY) == 0x29
    assert cmos_read(rtc, MONTH) == 0x02
    assert cmos_read(rtc, YEAR) == 0x24
    assert cmos_read(rtc, CENTURY) == 0x20
    assert cmos_read(rtc, REG_D) == 0x80  # VRT, and bit 6 clear as Linux checks


def test_real_host_clock() -> None:
    rtc = CmosRtc("rtc")
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
    read = linux_get_time(rtc)
    after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
    assert before <= read <= after


def test_binary_and_12_hour_modes() -> None:
    clock = FakeClock(datetime.datetime(2031, 12, 5, 13, 7, 9))
    rtc = CmosRtc("rtc", clock=clock)
    cmos_write(rtc, REG_B, H24 | DM_BINARY)
    fields = (SECONDS, MINUTES, HOURS, MDAY, MONTH, YEAR, CENTURY)
    assert [cmos_read(rtc, r) for r in fields] == [9, 7, 13, 5, 12, 31, 20]
    cmos_write(rtc, REG_B, DM_BINARY)  # 12-hour: 1 PM
    assert cmos_read(rtc, HOURS) == 0x80 | 1
    cmos_write(rtc, REG_B, 0)  # 12-hour BCD
    assert cmos_read(rtc, HOURS) == 0x80 | 0x01
    clock.now -= 13 * 3600  # 00:07 is 12 AM
    assert cmos_read(rtc, HOURS) == 0x12
    cmos_write(rtc, REG_B, H24)
    assert cmos_read(rtc, HOURS) == 0x00


def test_uip_is_set_only_just_before_the_second() -> None:
    clock = FakeClock(WHEN, fraction=0.9999)
    rtc = CmosRtc("rtc", clock=clock)
    assert cmos_read(rtc, REG_A) == 0x26 | UIP
    clock.now += 0.0002
    assert cmos_read(rtc, REG_A) == 0x26
    clock.now -= 0.5
    assert not cmos_read(rtc, REG_A) & UIP
    clock.now = int(clock.now) + 0.9999
    cmos_write(rtc, REG_B, SET | H24)
    assert not cmos_read(rtc, REG_A) & UIP  # no updates while SET
    cmos_write(rtc, REG_B, H24)
    cmos_write(rtc, REG_A, 0x66)  # divider held in reset
    assert not cmos_read(rtc, REG_A) & UIP


def test_uip_is_never_stuck_on_the_real_clock() -> None:
    rtc = CmosRtc("rtc")
    deadline = time.monotonic() + 1.5
    clear = 0
    while time.monotonic() < deadline and clear < 100:
        if not cmos_read(rtc, REG_A) & UIP:
            clear += 1
    assert clear == 100


def test_guest_sets_the_time_as_linux_does() -> None:
    """mc146818_set_time(): SET on, write the registers, SET off; the clock then runs from
    the new time (an offset to the host's)."""
    clock = FakeClock(WHEN)
    rtc = CmosRtc("rtc", clock=clock)
    control = cmos_read(rtc, REG_B)
    cmos_write(rtc, REG_B, control | SET)
    frozen = cmos_read(rtc, SECONDS)
    clock.now += 5
    assert cmos_read(rtc, SECONDS) == frozen  # frozen while SET
    new_time = {YEAR: 99, MONTH: 12, MDAY: 31, HOURS: 23, MINUTES: 59, SECONDS: 30, CENTURY: 19}
    for reg, value in new_time.items():
        cmos_write(rtc, reg, bcd(value))
    cmos_write(rtc, REG_B, control)
    assert linux_get_time(rtc) == datetime.datetime(1999, 12, 31, 23, 59, 30)
    clock.now += 40
    assert linux_get_time(rtc) == datetime.datetime(2000, 1, 1, 0, 0, 10)
    assert rtc.counters()["time_sets"] == 1


def test_single_register_write_without_set() -> None:
    clock = FakeClock(WHEN)
    rtc = CmosRtc("rtc", clock=clock)
    cmos_write(rtc, MINUTES, 0x15)
    assert cmos_read(rtc, MINUTES) == 0x15
    assert cmos_read(rtc, HOURS) == 0x23
    assert rtc.offset == pytest.approx((15 - 59) * 60, abs=1)


def test_invalid_time_is_ignored() -> None:
    rtc = CmosRtc("rtc", clock=FakeClock(WHEN))
    cmos_write(rtc, REG_B, SET | H24)
    cmos_write(rtc, MONTH, 0x13)  # month 13
    cmos_write(rtc, REG_B, H24)
    assert rtc.offset == 0
    cmos_write(rtc, SECONDS, 0xAA)  # not BCD
    assert rtc.offset == 0
    assert linux_get_time(rtc) == WHEN


def test_binary_time_set() -> None:
    clock = FakeClock(WHEN)
    rtc = CmosRtc("rtc", clock=clock)
    cmos_write(rtc, REG_B, SET | H24 | DM_BINARY)
    new_time = {YEAR: 1, MONTH: 1, MDAY: 2, HOURS: 3, MINUTES: 4, SECONDS: 5, CENTURY: 21}
    for reg, value in new_time.items():
        cmos_write(rtc, reg, value)
    cmos_write(rtc, REG_B, H24 | DM_BINARY)
    assert linux_get_time(rtc) == datetime.datetime(2101, 1, 2, 3, 4, 5)


def test_register_c_reports_update_ended() -> None:
    clock = FakeClock(WHEN)
    rtc = CmosRtc("rtc", clock=clock)
    assert cmos_read(rtc, REG_C) == 0
    clock.now += 1
    cmos_write(rtc, REG_B, H24 | UIE)
    assert cmos_read(rtc, REG_C) == 0x90  # IRQF | UF
    assert cmos_read(rtc, REG_C) == 0  # read clears


def test_nvram_and_nmi_mask() -> None:
    rtc = CmosRtc("rtc", clock=FakeClock(WHEN))
    nvram = [i for i in range(0x0E, 0x80) if i != CENTURY]
    assert len(nvram) == 113  # + the century byte: 114 bytes
    for index in nvram:
        cmos_write(rtc, index, index ^ 0x5A)
    rtc.write(0, bytes((0x80 | 0x20,)))  # NMI masked, index 0x20
    assert rtc.nmi_masked
    assert rtc.read(1, 1)[0] == 0x20 ^ 0x5A
    rtc.reset()  # battery-backed
    assert [cmos_read(rtc, i) for i in nvram] == [i ^ 0x5A for i in nvram]
    assert not rtc.nmi_masked
    assert rtc.read(0, 1) == b"\xff"  # the index port is write-only


def test_reset_keeps_time_and_format() -> None:
    clock = FakeClock(WHEN)
    rtc = CmosRtc("rtc", clock=clock)
    cmos_write(rtc, REG_B, H24 | DM_BINARY | UIE)
    cmos_write(rtc, MINUTES, 10)
    rtc.reset()
    assert cmos_read(rtc, REG_B) == H24 | DM_BINARY
    assert cmos_read(rtc, MINUTES) == 10


def test_outw_to_index_and_data() -> None:
    rtc = CmosRtc("rtc", clock=FakeClock(WHEN))
    rtc.write(0, bytes((0x40, 0x77)))  # outw 0x7740, 0x70: index 0x40, data 0x77
    assert cmos_read(rtc, 0x40) == 0x77


def test_device_type_memory_sizes(ctx: FakeContext) -> None:
    request = DeviceRequest(
        "rtc-cmos", "_rtc", {"mem_below_4g": 3 << 30, "mem_above_4g": 1 << 30}, pio=(0x70, 2)
    )
    rtc = CmosRtcType.create(ctx, request)
    assert rtc.kind == "rtc-cmos"
    ext = cmos_read(rtc, 0x34) | cmos_read(rtc, 0x35) << 8
    assert ext == ((3 << 30) - (16 << 20)) // 65536
    high = cmos_read(rtc, 0x5B) | cmos_read(rtc, 0x5C) << 8 | cmos_read(rtc, 0x5D) << 16
    assert high == (1 << 30) // 65536
    plain = CmosRtcType.create(ctx, DeviceRequest("rtc-cmos", "_rtc", pio=(0x70, 2)))
    assert cmos_read(plain, 0x34) == 0


ALARM_SECONDS, ALARM_MINUTES, ALARM_HOURS = 0x01, 0x03, 0x05
AIE, IRQF, AF, UF = 0x20, 0x80, 0x20, 0x10


def test_update_and_alarm_flags_and_edges() -> None:
    clock = FakeClock(WHEN)
    line = RecordingLine()
    rtc = CmosRtc("rtc", clock=clock, line=line)
    try:
        # The alarm at 23:59:59, one second from now.
        for reg, value in ((ALARM_SECONDS, 0x59), (ALARM_MINUTES, 0x59), (ALARM_HOURS, 0x23)):
            cmos_write(rtc, reg, value)
        cmos_write(rtc, REG_B, H24 | AIE)
        assert cmos_read(rtc, REG_C) == 0 and line.triggers == 0
        clock.now += 1
        assert cmos_read(rtc, REG_C) == IRQF | AF | UF
        assert line.triggers == 1
        clock.now += 1  # 00:00:00: no alarm, and UF alone does not interrupt with UIE off
        assert cmos_read(rtc, REG_C) == UF
        assert line.triggers == 1
        for reg in (ALARM_SECONDS, ALARM_MINUTES, ALARM_HOURS):
            cmos_write(rtc, reg, 0xC0)  # "don't care": every second
        clock.now += 1
        assert cmos_read(rtc, REG_C) == IRQF | AF | UF
        assert line.triggers == 2
    finally:
        rtc.close()


def test_update_interrupts_from_the_timer_thread() -> None:
    """What hwclock does through /dev/rtc: UIE on, wait for the interrupt, read C."""
    line = RecordingLine()
    rtc = CmosRtc("rtc", line=line)
    try:
        cmos_write(rtc, REG_B, H24 | UIE)
        wait_for(lambda: line.triggers >= 1, timeout=3, what="update interrupt")
        time.sleep(0.2)
        assert line.triggers == 1  # IRQF stays up until C is read: no second edge
        assert cmos_read(rtc, REG_C) & (IRQF | UF) == IRQF | UF
        wait_for(lambda: line.triggers >= 2, timeout=3, what="next update interrupt")
        cmos_write(rtc, REG_B, H24)
        wait_for(lambda: rtc._ticker is None, timeout=3, what="timer thread to stop")
        assert rtc.counters()["interrupts"] == line.triggers
    finally:
        rtc.close()


def test_no_line_no_thread() -> None:
    rtc = CmosRtc("rtc")
    cmos_write(rtc, REG_B, H24 | UIE)
    assert rtc._ticker is None
    rtc.close()


def test_device_type_interrupt_line(ctx: FakeContext) -> None:
    rtc = CmosRtcType.create(ctx, DeviceRequest("rtc-cmos", "_rtc", pio=(0x70, 2), irq=8))
    assert 8 in ctx.lines
    rtc.close()
