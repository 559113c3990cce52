"""ACPI memory hotplug on the host's side (vmmkit.acpi.memory_hotplug and vmmkit.memory_hotplug):
the MHPC registers as the guest's AML reads and writes them (Cloud Hypervisor's ``BusDevice for
MemoryManager``), DIMMs mapped into guest memory and a hypervisor slot with the GED told, the
requests refused with the reason and nothing changed, and a guest's own eject. The hypervisor here
records its memory slots (a stand-in: the real KVM slot and Linux using the memory are
tests/linux/test_linux_memory_hotplug.py); the AML is run by acpiexec in
tests/unit/x86_64/test_x86_memory_hotplug.py."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from vmmkit.acpi.memory_hotplug import (
    BASE_HIGH,
    BASE_LOW,
    EJECT,
    ENABLED,
    INSERTING,
    LENGTH_HIGH,
    LENGTH_LOW,
    MEMORY_HOTPLUG_SIZE,
    PROXIMITY,
    REMOVING,
    SELECTION,
    STATUS,
    MemoryHotplugController,
)
from vmmkit.arch import MemoryLayout
from vmmkit.config import ConfigError, MemoryConfig, VmConfig
from vmmkit.device import Device
from vmmkit.device_manager import DeviceManager
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.memory_hotplug import DEVICE_ID, MemoryHotplug
from vmmkit.plugin import collect_registries, make_plugin_manager

MiB = 1 << 20
GiB = 1 << 30
AREA = MemoryRange(4 * GiB, 2 * GiB)
REGISTERS = MemoryRange(0xC7FF_C000, MEMORY_HOTPLUG_SIZE)
LAYOUT = MemoryLayout(ram=(MemoryRange(0, 64 * MiB),), device_mmio=MemoryRange(0xC000_0000, 128 * MiB),
                      memory_hotplug=AREA, memory_hotplug_registers=REGISTERS)


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def read32(controller: MemoryHotplugController, offset: int) -> int:
    return int.from_bytes(controller.read(offset, 4), "little")


# -- the register block --------------------------------------------------------------------------


def test_the_selected_slot_reads_its_base_length_and_status() -> None:
    controller = MemoryHotplugController("_mh")
    controller.plug(1, 0x1_2345_0000, 0x2_0800_0000)
    controller.write(SELECTION, u32(1))
    assert read32(controller, BASE_LOW) == 0x2345_0000 and read32(controller, BASE_HIGH) == 1
    assert read32(controller, LENGTH_LOW) == 0x0800_0000 and read32(controller, LENGTH_HIGH) == 2
    assert read32(controller, PROXIMITY) == 0
    assert controller.read(STATUS, 1) == bytes([ENABLED | INSERTING])
    controller.write(SELECTION, u32(0))
    assert read32(controller, BASE_LOW) == 0 and controller.read(STATUS, 1) == b"\0"


def test_the_guest_acknowledges_an_insertion_and_a_removal_request() -> None:
    controller = MemoryHotplugController("_mh")
    controller.plug(0, 4 * GiB, 128 * MiB)
    controller.write(STATUS, bytes([REMOVING]))  # nothing to acknowledge yet: ignored
    assert controller.slot(0)[2] == ENABLED | INSERTING
    controller.write(STATUS, bytes([INSERTING]))
    assert controller.slot(0)[2] == ENABLED and controller.counters()["insertions"] == 1
    controller.request_removal(0)
    assert controller.slot(0)[2] == ENABLED | REMOVING
    controller.write(STATUS, bytes([REMOVING]))
    assert controller.slot(0)[2] == ENABLED


def test_an_eject_empties_the_slot_and_calls_back_once() -> None:
    ejected: list[int] = []
    controller = MemoryHotplugController("_mh", on_eject=ejected.append)
    controller.plug(3, 4 * GiB, 128 * MiB)
    controller.write(SELECTION, u32(3))
    controller.write(STATUS, bytes([EJECT]))
    controller.write(STATUS, bytes([EJECT]))  # an empty slot: nothing more
    assert ejected == [3] and controller.slot(3) == (0, 0, 0) and controller.free_slot() == 0


def test_bad_accesses_answer_zeros_and_change_nothing() -> None:
    controller = MemoryHotplugController("_mh", slots=2)
    controller.plug(0, 4 * GiB, 128 * MiB)
    controller.write(SELECTION, u32(7))  # out of range: reads zeros, as CH's
    assert read32(controller, BASE_LOW) == 0 and controller.read(STATUS, 1) == b"\0"
    controller.write(STATUS, bytes([EJECT]))
    controller.write(SELECTION, u32(0))
    assert controller.read(BASE_LOW, 2) == b"\0\0"  # base and length take dwords
    assert controller.read(STATUS, 4) == b"\0" * 4  # the status takes a byte
    controller.write(0x15, b"\xff")
    controller.write(STATUS, b"\x08\x00")
    assert controller.slot(0) == (4 * GiB, 128 * MiB, ENABLED | INSERTING)
    assert controller.counters()["bad_accesses"] >= 6
    controller.write(0x04, u32(1))  # MOEV and MOSC: accepted, ignored
    controller.write(0x08, u32(1))
    with pytest.raises(ValueError):
        controller.plug(0, 5 * GiB, 128 * MiB)  # in use


def test_a_reset_keeps_the_plugged_memory_but_nothing_pending() -> None:
    controller = MemoryHotplugController("_mh")
    controller.plug(0, 4 * GiB, 128 * MiB)
    controller.request_removal(0)
    controller.write(SELECTION, u32(0))
    controller.reset()
    assert controller.slot(0) == (4 * GiB, 128 * MiB, ENABLED) and controller.selected == 0


# -- DIMMs ---------------------------------------------------------------------------------------


class RecordingVm:
    """Stands for a hypervisor VM: records memory slots (and may refuse one)."""

    supports_ioeventfd = False
    supports_irqfd = False

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.refuse = False

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, **_: Any) -> None:
        if self.refuse:
            raise OSError(22, "Invalid argument")
        assert slot not in self.slots
        self.slots[slot] = (guest_addr, size, host_addr)

    def remove_memory_region(self, slot: int) -> None:
        del self.slots[slot]

    def add_port_sink(self, sink: Any) -> bool:
        return False

    def remove_port_sink(self, port: int) -> None:
        pass


class Ged(Device):
    """Stands for the ACPI GED: counts the memory notifications."""

    handles_memory_hotplug_notification: ClassVar[bool] = True

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.notified = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass

    def notify_memory_devices_changed(self) -> None:
        self.notified += 1


@pytest.fixture
def hotplug() -> Any:
    config = MemoryConfig(size=64 * MiB, hotplug_size=2 * GiB)
    memory = GuestMemory.allocate(LAYOUT.ram)
    vm = RecordingVm()
    vm.slots[0] = (0, 64 * MiB, memory.host_address(0))
    manager = DeviceManager(
        vm=vm, memory=memory, layout=LAYOUT, config=VmConfig(memory=config),  # type: ignore[arg-type]
        event_loop=EventLoop(), registries=collect_registries(make_plugin_manager(autoload=False)),
        context=None, virtio_transport="mmio")  # type: ignore[arg-type]
    from vmmkit.device import DeviceRequest

    ged = Ged("_ged")
    manager.place(ged, DeviceRequest("ged", "_ged", mmio=(0xC7FF_F000, 1)))
    hotplug = MemoryHotplug.attach(manager, LAYOUT, config, memory, vm)  # type: ignore[arg-type]
    assert hotplug is not None
    yield hotplug, manager, memory, vm, ged
    hotplug.close()
    manager.close()
    memory.close()


def test_attach_places_the_registers_where_the_layout_says(hotplug: Any) -> None:
    _hotplug, manager, *_ = hotplug
    placed = manager.get(DEVICE_ID)
    assert placed.mmio == (REGISTERS.start, REGISTERS.size) and placed.kind == "memory-hotplug"
    assert manager.mmio_bus.read(REGISTERS.start + STATUS, 1) == b"\0"


def test_no_hotplug_size_no_hotplug_and_an_architecture_without_it_refuses() -> None:
    config = MemoryConfig(size=64 * MiB)
    assert MemoryHotplug.attach(None, LAYOUT, config, None, None) is None  # type: ignore[arg-type]
    without = MemoryLayout(ram=LAYOUT.ram, device_mmio=LAYOUT.device_mmio)
    with pytest.raises(ConfigError, match="no ACPI memory hotplug"):
        MemoryHotplug.attach(None, without, MemoryConfig(size=64 * MiB, hotplug_size=GiB),  # type: ignore[arg-type]
                             None, None)  # type: ignore[arg-type]


def test_each_resize_plugs_a_dimm_after_the_last(hotplug: Any) -> None:
    hp, manager, memory, vm, ged = hotplug
    assert hp.resize(64 * MiB + 128 * MiB) == 128 * MiB
    first = memory.find_region(4 * GiB)
    assert first is not None and first.range == MemoryRange(4 * GiB, 128 * MiB)
    assert vm.slots[1] == (4 * GiB, 128 * MiB, first.host_address) and first.slot == 1
    assert memory.find_region(4 * GiB + 5) is first and ged.notified == 1
    memory.write_u64(4 * GiB + 128 * MiB - 8, 0x1122_3344)  # devices reach it through GuestMemory
    assert memory.read_u64(4 * GiB + 128 * MiB - 8) == 0x1122_3344
    assert hp.controller.slot(0) == (4 * GiB, 128 * MiB, ENABLED | INSERTING)
    assert hp.resize(64 * MiB + 384 * MiB) == 256 * MiB
    second = memory.find_region(4 * GiB + 128 * MiB)
    assert second is not None and second.range == MemoryRange(4 * GiB + 128 * MiB, 256 * MiB)
    assert hp.controller.slot(1) == (4 * GiB + 128 * MiB, 256 * MiB, ENABLED | INSERTING)
    assert hp.current == 448 * MiB and hp.plugged == 384 * MiB and ged.notified == 2
    assert hp.resize(448 * MiB) == 0 and ged.notified == 2  # already there: nothing to do


@pytest.mark.parametrize(("desired", "message"), [
    (64 * MiB + 64 * MiB, "multiple of 128 MiB"),
    (64 * MiB + 2 * GiB + 128 * MiB, "at most 2112 MiB"),
    (32 * MiB, "never below the boot RAM 64 MiB"),
])
def test_what_cannot_be_done_is_refused_and_changes_nothing(hotplug: Any, desired: int, message: str) -> None:
    hp, manager, memory, vm, ged = hotplug
    with pytest.raises(ConfigError, match=message) as error:
        hp.resize(desired)
    assert error.value.option == "desired_ram"
    assert len(vm.slots) == 1 and len(memory.regions) == 1 and ged.notified == 0 and hp.controller.free_slot() == 0


def test_eight_dimms_at_most(hotplug: Any) -> None:
    hp, _manager, _memory, vm, _ged = hotplug
    for count in range(1, 9):
        hp.resize(64 * MiB + count * 128 * MiB)
    with pytest.raises(ConfigError, match="all 8 slots are plugged"):
        hp.resize(64 * MiB + 9 * 128 * MiB)
    assert len(vm.slots) == 9 and hp.current == 64 * MiB + GiB


def test_a_slot_the_hypervisor_refuses_leaves_nothing_behind(hotplug: Any) -> None:
    hp, _manager, memory, vm, ged = hotplug
    vm.refuse = True
    with pytest.raises(Exception, match="refused memory slot 1"):
        hp.resize(64 * MiB + 128 * MiB)
    assert len(memory.regions) == 1 and hp.plugged == 0 and ged.notified == 0 and hp.controller.free_slot() == 0


def test_a_dimm_the_guest_ejects_leaves_the_hypervisor_and_guest_memory(hotplug: Any) -> None:
    hp, manager, memory, vm, _ged = hotplug
    hp.resize(64 * MiB + 128 * MiB)
    hp.resize(64 * MiB + 256 * MiB)
    manager.mmio_bus.write(REGISTERS.start + SELECTION, u32(0))
    manager.mmio_bus.write(REGISTERS.start + STATUS, bytes([EJECT]))  # the guest's _EJ0
    assert sorted(vm.slots) == [0, 2] and memory.find_region(4 * GiB) is None
    assert memory.find_region(4 * GiB + 128 * MiB) is not None and hp.current == 64 * MiB + 128 * MiB
    assert hp.controller.free_slot() == 0


def test_guest_memory_lookups_stay_consistent_while_regions_come_and_go() -> None:
    memory = GuestMemory.allocate([MemoryRange(0, 1 * MiB), MemoryRange(8 * MiB, 1 * MiB)])
    from vmmkit.memory import map_region

    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                assert memory.find_region(8 * MiB + 4).start == 8 * MiB  # type: ignore[union-attr]
                assert memory.find_region(4 * MiB) is None
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(200):
            memory.add_region(map_region(MemoryRange(2 * MiB, 1 * MiB), 2, shared=False, hugepages=False,
                                         hugepage_size=None, thp=False, mergeable=False, prefault=False))
            from vmmkit.memory import close_region

            close_region(memory.remove_region(2 * MiB))
    finally:
        stop.set()
        thread.join()
        memory.close()
    assert not failures, failures


def test_a_smaller_size_asks_the_guest_to_eject_the_last_dimms(hotplug: Any) -> None:
    hp, manager, memory, vm, ged = hotplug
    for size in (128, 256, 384):  # DIMMs of 128, 128 and 128 MiB
        hp.resize(64 * MiB + size * MiB)
    with pytest.raises(ConfigError, match="one of 320 MiB, 192 MiB, 64 MiB") as error:
        hp.resize(64 * MiB + 200 * MiB)  # not whole DIMMs
    assert "whole hot-plugged DIMMs" in str(error.value)
    assert hp.resize(64 * MiB + 128 * MiB) == -256 * MiB and ged.notified == 4
    assert [hp.controller.slot(slot)[2] for slot in range(3)] == [ENABLED | INSERTING,
                                                                  ENABLED | INSERTING | REMOVING,
                                                                  ENABLED | INSERTING | REMOVING]
    assert len(vm.slots) == 4  # nothing leaves before the guest ejects it
    with pytest.raises(ConfigError, match="has not ejected"):
        hp.resize(64 * MiB + 256 * MiB)
    assert hp.resize(64 * MiB + 128 * MiB) == 0 and ged.notified == 5  # asked again: told again
    for slot in (2, 1):  # the guest's _EJ0 of each
        manager.mmio_bus.write(REGISTERS.start + SELECTION, u32(slot))
        manager.mmio_bus.write(REGISTERS.start + STATUS, bytes([EJECT]))
    assert sorted(vm.slots) == [0, 1] and hp.current == 64 * MiB + 128 * MiB
    assert memory.find_region(4 * GiB + 128 * MiB) is None
    assert hp.resize(64 * MiB + 256 * MiB) == 128 * MiB  # and memory can come back
    assert memory.find_region(4 * GiB + 128 * MiB) is not None


def test_a_reset_removes_what_the_guest_was_asked_to_eject(hotplug: Any) -> None:
    hp, manager, memory, vm, _ged = hotplug
    hp.resize(64 * MiB + 128 * MiB)
    hp.resize(64 * MiB + 256 * MiB)
    hp.resize(64 * MiB + 128 * MiB)
    manager.reset()
    assert sorted(vm.slots) == [0, 1] and hp.current == 64 * MiB + 128 * MiB
    assert hp.controller.slot(0) == (4 * GiB, 128 * MiB, ENABLED) and hp.controller.slot(1) == (0, 0, 0)
    assert hp.resize(64 * MiB + 128 * MiB) == 0
