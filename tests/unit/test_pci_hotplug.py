"""ACPI PCI hotplug on the host's side (vmmkit.pci.hotplug and the device manager): the
PCIU/PCID/B0EJ/PSEG registers as the guest's AML reads and writes them, a hot-added function
in a free slot with the GED told, removal only once the guest ejects, and everything freed.
Linux judging the whole is tests/linux/test_linux_hotplug.py; the AML is run by acpiexec in
tests/unit/x86_64/test_x86_pci_hotplug.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from vmmkit import hookimpl
from vmmkit.arch import MemoryLayout
from vmmkit.config import VmConfig
from vmmkit.device import Device, DeviceContext, DeviceRequest, DeviceType
from vmmkit.device_manager import DeviceManager
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import PciFunction
from vmmkit.pci.hotplug import B0EJ, PCID, PCIU, PSEG, PciHotplugController
from vmmkit.plugin import collect_registries, make_plugin_manager

MIB = 1 << 20
HOTPLUG = MemoryRange(0xD00F_E000, 0x10)
LAYOUT = MemoryLayout(
    ram=(MemoryRange(0, 4 * MIB),),
    device_mmio=MemoryRange(0xD000_0000, 0x10_0000),
    pci_mmio32=MemoryRange(0xC000_0000, 0x1000_0000),
    pci_ecam=MemoryRange(0xE800_0000, 0x1000_0000),
    pio=MemoryRange(0x1000, 0xF000),
    pci_hotplug=HOTPLUG,
)


class RecordingVm:
    supports_ioeventfd = False
    supports_irqfd = False

    def __init__(self) -> None:
        self.lines: list[tuple[int, bool]] = []

    def add_port_sink(self, sink: Any) -> bool:
        return False

    def remove_port_sink(self, port: int) -> None:
        pass

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))


class Card(PciFunction):
    kind: ClassVar[str] = "test-card"

    def __init__(self, name: str) -> None:
        config = PciConfigSpace(vendor_id=0x1234, device_id=0x0001, class_code=0xFF, subclass=0x00)
        config.add_bar(PciBar(0, 0x1000, BarKind.MEM32))
        super().__init__(name, config)
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Notifier(Device):
    """Stands for the ACPI GED: counts the notifications."""

    handles_pci_hotplug_notification: ClassVar[bool] = True

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.notified = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass

    def notify_pci_devices_changed(self) -> None:
        self.notified += 1


class Plain(Device):
    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class CardType(DeviceType):
    name: ClassVar[str] = "test-card"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Card:
        return Card(request.id)


class PlainType(DeviceType):
    name: ClassVar[str] = "plain"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Plain:
        return Plain(request.id)


class NotifierType(DeviceType):
    name: ClassVar[str] = "notifier"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Notifier:
        return Notifier(request.id)


class Types:
    @hookimpl
    def vmmkit_register_devices(self, registry: Any) -> None:
        for device_type in (CardType, PlainType, NotifierType):
            registry.add(device_type)


Events = list[tuple[str, dict[str, Any]]]


def make_manager(layout: MemoryLayout = LAYOUT, virtio: str = "pci") -> tuple[DeviceManager, Events]:
    events: Events = []
    manager = DeviceManager(
        vm=RecordingVm(),  # type: ignore[arg-type]
        memory=GuestMemory.allocate(layout.ram), layout=layout, config=VmConfig(), event_loop=EventLoop(),
        registries=collect_registries(make_plugin_manager(autoload=False, plugins=[Types()])),
        context=None,  # type: ignore[arg-type]  # the types here take nothing from it
        virtio_transport=virtio, emit=lambda name, **props: events.append((name, props)),
    )
    return manager, events


@pytest.fixture
def booted() -> Iterator[tuple[DeviceManager, Notifier, list[tuple[str, dict[str, Any]]]]]:
    manager, events = make_manager()
    notifier = manager.create(DeviceRequest("notifier", "_ged", mmio=(0xD00F_F000, 1)))
    assert notifier is not None
    manager.create(DeviceRequest("test-card", "boot-card"))  # a device there at boot: slot 1
    manager.enable_pci_hotplug()
    yield manager, notifier.device, events
    manager.close()
    manager.event_loop.close()
    manager.memory.close()


def reg_read(manager: DeviceManager, offset: int) -> int:
    data = manager.mmio_bus.read(HOTPLUG.start + offset, 4)
    assert data is not None
    return int.from_bytes(data, "little")


def reg_write(manager: DeviceManager, offset: int, value: int) -> None:
    manager.mmio_bus.write(HOTPLUG.start + offset, value.to_bytes(4, "little"))


def test_the_controller_is_placed_and_segment_0_routes_every_slot(booted: Any) -> None:
    manager, _notifier, _events = booted
    placed = manager.get("_pci_hotplug")
    assert isinstance(placed.device, PciHotplugController) and placed.mmio == (HOTPLUG.start, HOTPLUG.size)
    root = manager.pci_segment(0)
    assert root.hotplug
    routes = root.intx_routes()
    assert [slot for slot, _, _ in routes] == list(range(1, 32))  # empty slots too: the _PRT is written at boot
    assert len({gsi for _, _, gsi in routes}) == 4
    assert reg_read(manager, PCIU) == 0 and reg_read(manager, PCID) == 0 and reg_read(manager, PSEG) == 0


def test_hot_add_sets_pciu_and_notifies_then_pciu_reads_clear(booted: Any) -> None:
    manager, notifier, _events = booted
    placed = manager.hotplug(DeviceRequest("test-card", "hot"))
    assert placed.properties["bdf"] == "0000:00:02.0" and placed.properties["slot"] == 2
    assert notifier.notified == 1
    assert reg_read(manager, PCIU) == 1 << 2
    assert reg_read(manager, PCIU) == 0  # read clears, as CH's
    base, size = placed.properties["bars"][0]
    assert size == 0x1000 and manager.mmio_bus.read(base, 4) is not None
    # INTA on the line the _PRT names for slot 2
    root = manager.pci_segment(0)
    assert (2, 1, placed.irq) in root.intx_routes()


def test_removal_waits_for_the_guests_eject(booted: Any) -> None:
    manager, notifier, events = booted
    placed = manager.hotplug(DeviceRequest("test-card", "hot"))
    base, _size = placed.properties["bars"][0]
    gone = manager.unplug("hot")
    assert notifier.notified == 2 and not gone.is_set()
    assert reg_read(manager, PCID) == 1 << 2 and reg_read(manager, PCID) == 0
    assert "hot" in manager and manager.mmio_bus.read(base, 4) is not None  # still there until _EJ0
    assert reg_read(manager, B0EJ) == 0
    reg_write(manager, PSEG, 0)
    reg_write(manager, B0EJ, 1 << 2)  # the guest's _EJ0
    assert gone.is_set() and "hot" not in manager and placed.device.closed
    assert manager.mmio_bus.read(base, 4) is None and 2 not in manager.pci_segment(0).functions
    assert events[-1] == ("vm-device-removed", {"id": "hot", "bdf": "0000:00:02.0"})
    again = manager.hotplug(DeviceRequest("test-card", "again"))
    assert again.properties["slot"] == 2 and again.properties["bars"][0] == placed.properties["bars"][0]


def test_what_cannot_be_hotplugged_is_refused_and_leaves_nothing(booted: Any) -> None:
    manager, notifier, _events = booted
    before = [p.id for p in manager.devices]
    with pytest.raises(DeviceError, match="only PCI devices can be added"):
        manager.hotplug(DeviceRequest("plain", "p", mmio=(0xD000_0000, 0x1000)))
    with pytest.raises(DeviceError, match="already exists"):
        manager.hotplug(DeviceRequest("test-card", "boot-card"))
    with pytest.raises(DeviceError, match="is not a PCI device"):
        manager.unplug("_ged")
    with pytest.raises(DeviceError, match="no device with id"):
        manager.unplug("nothing")
    assert [p.id for p in manager.devices] == before and notifier.notified == 0
    for slot in range(2, 32):
        manager.hotplug(DeviceRequest("test-card", f"c{slot}"))
    with pytest.raises(DeviceError, match="all 31 PCI slots"):
        manager.hotplug(DeviceRequest("test-card", "one-too-many"))


def test_bad_guest_accesses_are_ignored(booted: Any) -> None:
    manager, _notifier, _events = booted
    manager.hotplug(DeviceRequest("test-card", "hot"))
    reg_write(manager, PSEG, 7)  # no such segment: the selection stays
    assert reg_read(manager, PSEG) == 0
    manager.mmio_bus.write(HOTPLUG.start + B0EJ, b"\x04")  # not a dword: ignored
    reg_write(manager, B0EJ, 1 << 0 | 1 << 9)  # the host bridge and an empty slot: nothing happens
    assert "hot" in manager and "boot-card" in manager
    assert manager.mmio_bus.read(HOTPLUG.start + PCIU, 2) == b"\0\0"
    assert manager.get("_pci_hotplug").device.counters()["bad_accesses"] == 3


def test_a_reset_carries_out_pending_removals(booted: Any) -> None:
    manager, _notifier, events = booted
    manager.hotplug(DeviceRequest("test-card", "hot"))
    gone = manager.unplug("hot")
    manager.reset()
    assert gone.is_set() and "hot" not in manager and events[-1][0] == "vm-device-removed"
    assert reg_read(manager, PCID) == 0


def test_no_hotplug_without_the_layouts_registers_or_over_virtio_mmio() -> None:
    for layout, virtio, message in ((attrs_evolve(LAYOUT, pci_hotplug=None), "pci", "no PCI hotplug controller"),
                                    (LAYOUT, "mmio", "does not take hotplug")):
        manager, _ = make_manager(layout, virtio)
        manager.create(DeviceRequest("notifier", "_ged", mmio=(0xD00F_F000, 1)))
        manager.enable_pci_hotplug()
        try:
            with pytest.raises(DeviceError, match=message):
                manager.hotplug(DeviceRequest("test-card", "hot"))
            assert "hot" not in manager
        finally:
            manager.close()
            manager.event_loop.close()
            manager.memory.close()


def test_msi_gsis_given_back_are_handed_out_again() -> None:
    from vmmkit.irq import GsiAllocator

    gsis = GsiAllocator(24, 27)
    first = [gsis.allocate() for _ in range(4)]
    assert first == [24, 25, 26, 27] and gsis.allocate() is None
    gsis.free(26)
    gsis.free(25)
    gsis.free(25)  # twice: still once
    gsis.free(99)  # never handed out: ignored
    assert [gsis.allocate(), gsis.allocate(), gsis.allocate()] == [25, 26, None]


def attrs_evolve(layout: MemoryLayout, **changes: Any) -> MemoryLayout:
    import attrs

    return attrs.evolve(layout, **changes)
