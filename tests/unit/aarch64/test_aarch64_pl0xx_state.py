"""The PL011 and PL031 in a snapshot (issue 16): their registers round-trip into a new device,
and a state edited out of range is refused before anything changes."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from vmmkit_devices.legacy import pl011 as U
from vmmkit_devices.legacy import rtc_pl031 as R

from vmmkit.state import StateError


class Backend:
    def write(self, data: bytes) -> None:
        pass

    def input_ready(self) -> None:
        pass

    def attach(self, loop: object, sink: object) -> None:
        pass

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def trigger(self) -> None:
        pass

    def set_level(self, high: bool) -> None:
        self.levels.append(high)


def r32(dev: U.Pl011 | R.Pl031, offset: int) -> int:
    value: int = struct.unpack("<I", dev.read(offset, 4))[0]
    return value


def w32(dev: U.Pl011 | R.Pl031, offset: int, value: int) -> None:
    dev.write(offset, struct.pack("<I", value))


def uart() -> tuple[U.Pl011, Backend, Line]:
    backend, line = Backend(), Line()
    return U.Pl011("_serial", backend, line, irq=33), backend, line  # type: ignore[arg-type]


def test_the_pl011_registers_and_unread_input_go_to_a_new_uart() -> None:
    dev, _, _ = uart()
    w32(dev, U.LCR_H, 0x70)
    w32(dev, U.IBRD, 13)
    w32(dev, U.IMSC, U.INT_RX)
    dev.receive(b"ab")
    state = dev.save_state()
    other, _, line = uart()
    other.restore_state(state)
    assert (r32(other, U.LCR_H), r32(other, U.IBRD), r32(other, U.IMSC)) == (0x70, 13, U.INT_RX)
    assert line.levels[-1] is True  # the pending receive interrupt is raised again
    assert r32(other, U.DR) & 0xFF == ord("a") and r32(other, U.DR) & 0xFF == ord("b")


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["registers"].pop("0x030"), "_serial.registers: missing '0x030'"),
    (lambda s: s.__setitem__("imsc", 1 << 12), "_serial.imsc: 4096 is outside"),
    (lambda s: s.__setitem__("rx", [300]), "_serial.rx: expected at most 4096 bytes"),
])
def test_a_bad_pl011_state_is_refused_and_changes_nothing(change: Callable[[dict[str, Any]], None],
                                                         message: str) -> None:
    dev, _, _ = uart()
    state = dev.save_state()
    change(state)
    w32(dev, U.IBRD, 7)
    with pytest.raises(StateError, match=message):
        dev.restore_state(state)
    assert r32(dev, U.IBRD) == 7


def test_the_pl031_keeps_its_offset_and_match() -> None:
    clock = [1_700_000_000.0]
    dev = R.Pl031("_rtc", Line(), irq=34, clock=lambda: clock[0])
    w32(dev, R.LR, 1_800_000_000)
    w32(dev, R.MR, 1_800_000_100)
    w32(dev, R.IMSC, 1)
    state = dev.save_state()
    other = R.Pl031("_rtc", Line(), irq=34, clock=lambda: clock[0])
    other.restore_state(state)
    assert r32(other, R.DR) == 1_800_000_000 and r32(other, R.MR) == 1_800_000_100 and r32(other, R.IMSC) == 1
    with pytest.raises(StateError, match="_rtc.fired"):
        other.restore_state({**state, "fired": 1})
    dev.close()
    other.close()
