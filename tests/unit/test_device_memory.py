"""Device memory (:mod:`vmmkit.device_memory`): ranges of the 64-bit device window with their own
hypervisor slots, given back on unmap, and what happens when the hypervisor says no."""

from __future__ import annotations

import pytest

from vmmkit.allocator import AddressAllocator
from vmmkit.device_memory import FIRST_SLOT, DeviceMemory
from vmmkit.errors import DeviceError

MiB = 1 << 20
BASE = 8 << 30


class Slots:
    """The memory-slot half of a backend VM; ``refuse_add`` / ``refuse_remove`` fail those calls
    as a backend does (emu cannot remove a slot once vCPUs exist)."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.refuse_add = False
        self.refuse_remove = False

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        if self.refuse_add:
            raise OSError(22, "Invalid argument")
        assert slot not in self.slots
        self.slots[slot] = (guest_addr, size, host_addr)

    def remove_memory_region(self, slot: int) -> None:
        if self.refuse_remove:
            raise RuntimeError("not supported once vCPUs exist")
        del self.slots[slot]


def device_memory(vm: Slots, size: int = 1 << 30) -> DeviceMemory:
    return DeviceMemory(vm, AddressAllocator(BASE, size, "64-bit device window"))  # type: ignore[arg-type]


def test_aligned_ranges_and_slots_of_their_own() -> None:
    vm = Slots()
    memory = device_memory(vm)
    assert memory.allocator is not None
    memory.allocator.allocate(0x4000, 0x4000)  # a 64-bit BAR placed first, as the PCI root does
    first = memory.map(0x1000_0000, 4 * MiB, alignment=2 * MiB)
    second = memory.map(0x2000_0000, 2 * MiB, alignment=2 * MiB)
    assert (first.start, first.slot) == (BASE + 2 * MiB, FIRST_SLOT)
    assert (second.start, second.slot) == (BASE + 6 * MiB, FIRST_SLOT + 1)
    assert vm.slots == {FIRST_SLOT: (BASE + 2 * MiB, 4 * MiB, 0x1000_0000),
                        FIRST_SLOT + 1: (BASE + 6 * MiB, 2 * MiB, 0x2000_0000)}
    assert first.unmap() and first.unmap()  # idempotent
    assert FIRST_SLOT not in vm.slots and memory.regions == [second]
    again = memory.map(0x3000_0000, 2 * MiB, alignment=2 * MiB)
    assert (again.start, again.slot) == (BASE + 2 * MiB, FIRST_SLOT)  # range and slot reused


def test_a_refused_slot_gives_the_range_back() -> None:
    vm = Slots()
    memory = device_memory(vm)
    vm.refuse_add = True
    with pytest.raises(DeviceError, match=f"refused memory slot {FIRST_SLOT}"):
        memory.map(0x1000_0000, 2 * MiB, alignment=2 * MiB)
    vm.refuse_add = False
    assert memory.map(0x1000_0000, 2 * MiB, alignment=2 * MiB).start == BASE and memory.regions


def test_a_slot_the_backend_cannot_remove_stays_reserved() -> None:
    vm = Slots()
    memory = device_memory(vm)
    region = memory.map(0x1000_0000, 2 * MiB, alignment=2 * MiB)
    vm.refuse_remove = True
    assert region.unmap() is False  # the caller must keep its host mapping
    assert memory.map(0x2000_0000, 2 * MiB, alignment=2 * MiB).start == BASE + 2 * MiB  # not reused


def test_no_room_and_no_window_are_device_errors() -> None:
    memory = device_memory(Slots(), size=4 * MiB)
    with pytest.raises(DeviceError, match="no room for 0x800000 bytes"):
        memory.map(0x1000_0000, 8 * MiB, alignment=2 * MiB)
    with pytest.raises(DeviceError, match="no 64-bit device window"):
        DeviceMemory(Slots(), None).map(0x1000_0000, 2 * MiB, alignment=2 * MiB)  # type: ignore[arg-type]
