from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmkit.bus import Bus
from vmmkit.errors import BusError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_accesses_reach_the_device_at_its_own_offsets() -> None:
    bus, device = Bus("pio"), Recorder()
    bus.insert(device, 0x3F8, 8)
    assert bus.read(0x3FA, 2) == b"\x02\x02"
    assert bus.write(0x3FF, b"x")
    assert device.writes == [(7, b"x")]


def test_unclaimed_addresses_are_reported_as_such() -> None:
    bus = Bus("mmio")
    bus.insert(Recorder(), 0x1000, 0x100)
    assert bus.read(0xFFF, 1) is None
    assert bus.read(0x1100, 4) is None
    assert not bus.write(0x1100, b"\0")


@pytest.mark.parametrize("base,length", [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x20)])
def test_overlapping_ranges_are_refused(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.insert(Recorder(), 0x3F8, 8)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Recorder(), base, length)


def test_adjacent_ranges_and_removal() -> None:
    bus = Bus("pio")
    first, second = Recorder(), Recorder()
    bus.insert(first, 0x60, 1)
    bus.insert(second, 0x61, 4)
    assert bus.lookup(0x61)[1] is second
    assert bus.remove(0x60) is first
    assert bus.lookup(0x60) is None
    with pytest.raises(BusError):
        bus.remove(0x60)


def test_zero_length_is_refused() -> None:
    with pytest.raises(BusError, match="zero length"):
        Bus("pio").insert(Recorder(), 0x10, 0)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 64)), max_size=30), st.integers(0, 0x10040))
def test_lookup_agrees_with_a_linear_scan(ranges: list[tuple[int, int]], addr: int) -> None:
    bus = Bus("pio")
    placed = []
    for base, length in ranges:
        try:
            bus.insert(Recorder(), base, length)
            placed.append((base, length))
        except BusError:
            assert any(b < base + length and base < b + n for b, n in placed)
    expected = [b for b, n in placed if b <= addr < b + n]
    found = bus.lookup(addr)
    assert (found[0].base if found else None) == (expected[0] if expected else None)
