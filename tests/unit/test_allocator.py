from __future__ import annotations

import pytest

from vmmkit.allocator import AddressAllocator
from vmmkit.errors import BusError


def test_first_fit_with_alignment() -> None:
    alloc = AddressAllocator(0x1000, 0x10000)
    assert alloc.allocate(0x100) == 0x1000
    assert alloc.allocate(0x1000, alignment=0x1000) == 0x2000
    assert alloc.allocate(0x10) == 0x1100


def test_fixed_placements_and_exhaustion() -> None:
    alloc = AddressAllocator(0, 0x1000)
    assert alloc.allocate(0x100, at=0x800) == 0x800
    with pytest.raises(BusError):
        alloc.allocate(0x10, at=0x880)
    assert alloc.allocate(0x800) == 0
    with pytest.raises(BusError, match="no room"):
        alloc.allocate(0x800)
    alloc.free(0)
    assert alloc.allocate(0x800) == 0


def test_bad_requests() -> None:
    alloc = AddressAllocator(0, 0x1000)
    for size, alignment in [(0, 1), (1, 3), (-4, 1)]:
        with pytest.raises(BusError):
            alloc.allocate(size, alignment)
    with pytest.raises(BusError):
        alloc.free(0x10)
