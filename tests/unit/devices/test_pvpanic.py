"""pvpanic: the guest's panic notification becomes an event."""

from __future__ import annotations

from typing import Any

from vmmkit_devices.debug.pvpanic import PANICKED, SUPPORTED, PvPanic


def make() -> tuple[PvPanic, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    return PvPanic("_pvpanic", lambda name, **props: events.append((name, props))), events


def test_reads_say_which_events_are_supported() -> None:
    device, _ = make()
    assert device.read(0, 1) == bytes([SUPPORTED])


def test_a_panic_write_becomes_an_event() -> None:
    device, events = make()
    device.write(0, bytes([PANICKED]))
    assert events == [("guest-panic", {"kind": "panicked"})]
    assert device.counters() == {"panics": 1}


def test_other_writes_and_offsets_are_ignored() -> None:
    device, events = make()
    device.write(0, b"\x00")
    device.write(0, b"\xf0")
    device.write(1, b"\x01")
    device.write(0, b"")
    assert events == [] and device.read(3, 2) == b"\xff\xff"
