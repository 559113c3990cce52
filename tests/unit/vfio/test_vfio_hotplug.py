"""``vm.add-device`` / ``vm.remove-device`` on a running VM: a VFIO function hot-added through the
device manager's ACPI PCI hotplug (free slot, the GED told) and released once the guest ejects
it. The device is on a simulated ``/dev/vfio`` (contract test); the manager, hotplug registers
and buses are the real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from vfio_support import VfioVm, edu_like
from vmmkit_devices.vfio.simulator import SimulatedVfio, sysfs_device
from vmmkit_devices.vfio.transport import VfioPciTransport, VfioRequest

from vmmkit import hookimpl
from vmmkit.arch import MemoryLayout
from vmmkit.config import VmConfig
from vmmkit.device import Device, DeviceContext, DeviceRequest, DeviceType
from vmmkit.device_manager import DeviceManager
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.pci.hotplug import B0EJ, PCIU, PSEG
from vmmkit.plugin import collect_registries, make_plugin_manager

MIB = 1 << 20
HOTPLUG = MemoryRange(0xD00F_E000, 0x10)
LAYOUT = MemoryLayout(ram=(MemoryRange(0, 4 * MIB),), device_mmio=MemoryRange(0xD000_0000, 0x10_0000),
                      pci_mmio32=MemoryRange(0xC000_0000, 0x1000_0000), pci_ecam=MemoryRange(0xE800_0000, 0x1000_0000),
                      pio=MemoryRange(0x1000, 0xF000), pci_hotplug=HOTPLUG)
SIM = SimulatedVfio()


class Ged(Device):
    handles_pci_hotplug_notification: ClassVar[bool] = True
    notified = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass

    def notify_pci_devices_changed(self) -> None:
        self.notified += 1


class GedType(DeviceType):
    name: ClassVar[str] = "ged"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Ged:
        return Ged(request.id)


class SimulatedVfioType(DeviceType):
    """``vfio-pci``'s requests, opened on the simulated /dev/vfio instead of the host's."""

    name: ClassVar[str] = "vfio-pci"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> VfioRequest:
        return VfioRequest(request.config, kernel=SIM, dev_dir=SIM.dev_dir)


class Plugin:
    @hookimpl
    def vmmkit_register_devices(self, registry: Any) -> None:
        registry.add(GedType)
        registry.add(SimulatedVfioType)

    @hookimpl
    def vmmkit_register_transports(self, registry: Any) -> None:
        registry.add(VfioPciTransport)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[DeviceManager]:
    manager = DeviceManager(vm=VfioVm(), memory=GuestMemory.allocate(LAYOUT.ram), layout=LAYOUT, config=VmConfig(),
                            event_loop=EventLoop(), registries=collect_registries(make_plugin_manager(
                                autoload=False, plugins=[Plugin()])),
                            context=None,  # type: ignore[arg-type]  # the types here take nothing from it
                            virtio_transport="pci")
    manager.create(DeviceRequest("ged", "_ged", mmio=(0xD00F_F000, 1)))
    manager.enable_pci_hotplug()
    yield manager
    manager.close()
    manager.event_loop.close()
    manager.memory.close()


def test_hot_add_and_guest_eject(manager: DeviceManager, tmp_path: Path) -> None:
    device = SIM.add_device(edu_like())
    path = sysfs_device(str(tmp_path), device.name, device.group)
    placed = manager.hotplug(DeviceRequest("vfio-pci", "pt0", path, transport="vfio-pci"))
    assert placed.transport == "vfio-pci" and placed.properties["bdf"] == "0000:00:01.0"
    assert manager.get("_ged").device.notified == 1
    assert int.from_bytes(manager.mmio_bus.read(HOTPLUG.start + PCIU, 4) or b"", "little") == 1 << 1
    assert device.opened and SIM.dma
    vm: VfioVm = manager.vm  # type: ignore[assignment]
    assert vm.bar_slots() == [(placed.properties["bars"][0][0], MIB)]
    gone = manager.unplug("pt0")
    assert device.opened and not gone.is_set()  # until the guest's _EJ0
    manager.mmio_bus.write(HOTPLUG.start + PSEG, (0).to_bytes(4, "little"))
    manager.mmio_bus.write(HOTPLUG.start + B0EJ, (1 << 1).to_bytes(4, "little"))
    assert gone.is_set() and "pt0" not in manager
    assert not device.opened and SIM.open_groups == set() and SIM.containers == set() and vm.slots == {}
