"""The userspace i8254 PIT: what Linux's i8253 clockevent and PIT readers do, on a fake clock."""

from __future__ import annotations

import time

import pytest
from devices_support import FakeContext, RecordingLine, wait_for
from vmmkit_devices.legacy.pit import I8254, PIT_HZ, I8254Type

from vmmkit.device import DeviceRequest

CH0, CH2, CONTROL = 0, 2, 3
LATCH_250HZ = (PIT_HZ + 125) // 250  # Linux's LATCH for HZ=250


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_ticks(self, ticks: int, dilation: int = 1) -> None:
        self.now += ticks * dilation / PIT_HZ + 1e-9


def make(dilation: int = 1) -> tuple[I8254, FakeClock, RecordingLine]:
    clock, line = FakeClock(), RecordingLine()
    return I8254("pit", line, dilation=dilation, clock=clock, threaded=False), clock, line


def out(pit: I8254, offset: int, value: int) -> None:
    pit.write(offset, bytes([value]))


def inb(pit: I8254, offset: int) -> int:
    return pit.read(offset, 1)[0]


def read_word(pit: I8254, channel: int) -> int:
    low = inb(pit, channel)
    return low | inb(pit, channel) << 8


def periodic(pit: I8254, count: int) -> None:
    """Linux's pit_set_periodic(): channel 0, LSB then MSB, mode 2."""
    out(pit, CONTROL, 0x34)
    out(pit, CH0, count & 0xFF)
    out(pit, CH0, count >> 8)


def test_periodic_mode_interrupts_once_per_period() -> None:
    pit, clock, line = make()
    periodic(pit, LATCH_250HZ)
    assert pit.poll() == 0
    clock.advance_ticks(LATCH_250HZ - 1)
    assert pit.poll() == 0
    clock.advance_ticks(1)
    assert pit.poll() == 1
    for _ in range(3):
        clock.advance_ticks(LATCH_250HZ)
        assert pit.poll() == 1
    assert line.triggers == 4


def test_missed_periods_merge_into_one_edge() -> None:
    pit, clock, line = make()
    periodic(pit, 1000)
    clock.advance_ticks(5500)
    assert pit.poll() == 1
    assert pit.poll() == 0
    assert line.triggers == 1
    assert pit.counters()["merged"] == 4
    clock.advance_ticks(500)
    assert pit.poll() == 1


def test_oneshot_mode_4_fires_once_after_the_count() -> None:
    """Linux's oneshot clockevent: control 0x38 (mode 4), then the delta LSB, MSB."""
    pit, clock, line = make()
    out(pit, CONTROL, 0x38)
    out(pit, CH0, 100)
    out(pit, CH0, 0)
    clock.advance_ticks(100)
    assert pit.poll() == 0  # OUT goes low at terminal count, the edge comes a tick later
    clock.advance_ticks(1)
    assert pit.poll() == 1
    clock.advance_ticks(100_000)
    assert pit.poll() == 0
    assert line.triggers == 1


def test_mode_0_fires_at_terminal_count_and_the_first_byte_stops_it() -> None:
    pit, clock, line = make()
    out(pit, CONTROL, 0x30)
    out(pit, CH0, 0x10)
    out(pit, CH0, 0x00)
    clock.advance_ticks(8)
    out(pit, CH0, 0x20)  # LSB of a new count: counting stops
    clock.advance_ticks(100)
    assert pit.poll() == 0
    out(pit, CH0, 0x00)
    clock.advance_ticks(0x20)
    assert pit.poll() == 1
    assert line.triggers == 1


def test_dilation_slows_the_counters_down() -> None:
    pit, clock, line = make(dilation=10)
    periodic(pit, LATCH_250HZ)
    clock.now += LATCH_250HZ / PIT_HZ  # one period of wall-clock time: a tenth of a period here
    assert pit.poll() == 0
    clock.advance_ticks(LATCH_250HZ, dilation=10)
    assert pit.poll() == 1
    assert line.triggers == 1


def test_counter_latch_freezes_the_value_until_read() -> None:
    pit, clock, _ = make()
    periodic(pit, 1000)
    clock.advance_ticks(100)
    out(pit, CONTROL, 0x00)  # latch counter 0
    clock.advance_ticks(300)
    assert read_word(pit, CH0) == 900
    assert read_word(pit, CH0) == 600  # unlatched: the live count


def test_read_back_command_latches_status_then_count() -> None:
    pit, clock, _ = make()
    out(pit, CONTROL, 0xB6)  # counter 2, LSB/MSB, mode 3 (what PIT calibration uses)
    out(pit, CONTROL, 0xE8)  # read back status only, counter 2
    status_before = inb(pit, CH2)
    assert status_before & 0x40  # null count: no count written yet
    out(pit, CH2, 0xFF)
    out(pit, CH2, 0xFF)
    clock.advance_ticks(10)
    out(pit, CONTROL, 0xC8)  # read back count and status of counter 2
    status = inb(pit, CH2)
    assert status & 0x3F == (3 << 4) | (3 << 1)
    assert not status & 0x40
    assert read_word(pit, CH2) == (0xFFFF - 20) & 0xFFFF  # mode 3 counts down by two


def test_lsb_only_access() -> None:
    pit, clock, _ = make()
    out(pit, CONTROL, 0x90)  # counter 2, LSB only, mode 0
    out(pit, CH2, 50)
    clock.advance_ticks(20)
    assert inb(pit, CH2) == 30
    assert inb(pit, CH2) == 30


def test_pause_stops_time_and_delivers_a_missed_edge_on_resume() -> None:
    pit, clock, line = make()
    periodic(pit, 1000)
    clock.advance_ticks(500)
    pit.pause()
    clock.advance_ticks(100_000)
    assert pit.poll() == 0
    pit.resume()
    clock.advance_ticks(499)
    assert pit.poll() == 0
    clock.advance_ticks(1)
    assert pit.poll() == 1
    assert line.triggers == 1


def test_hostile_accesses_read_open_bus_and_never_raise() -> None:
    pit, _, _ = make()
    assert pit.read(CONTROL, 1) == b"\xff"
    assert pit.read(7, 1) == b"\xff"
    for value in range(256):
        out(pit, CONTROL, value)
        for channel in range(3):
            out(pit, channel, value)
            inb(pit, channel)
    pit.write(0, b"\x00" * 9)
    assert pit.errors == 0


def test_threaded_device_raises_irq0_in_real_time(ctx: FakeContext) -> None:
    pit = I8254Type.create(ctx, DeviceRequest("i8254", "_pit", {"dilation": 2}, pio=(0x40, 4), irq=0))
    try:
        assert pit.dilation == 2
        start = time.monotonic()
        periodic(pit, PIT_HZ // 100)  # 100 Hz in guest time: 50 Hz here
        wait_for(lambda: ctx.lines[0].triggers >= 5, timeout=5, what="five PIT interrupts")
        assert time.monotonic() - start >= 0.08
    finally:
        pit.close()


def test_bad_dilation_is_refused() -> None:
    with pytest.raises(ValueError):
        I8254("pit", dilation=0)
