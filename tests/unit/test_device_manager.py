"""The device manager with every kind of device: a platform device (ports, native port sinks),
a plain PCI function a plugin builds itself (no virtio), a transport a plugin registers, device
types from the registry, and removal giving everything back."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import pytest

from vmmkit import hookimpl
from vmmkit.arch import MemoryLayout
from vmmkit.config import VmConfig
from vmmkit.device import Device, DeviceContext, DeviceRequest, DeviceType, NativePortsUpdate, PlacedDevice
from vmmkit.device_manager import DeviceManager
from vmmkit.errors import BusError, DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.hypervisor import PortSink
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import PciFunction
from vmmkit.plugin import collect_registries, make_plugin_manager
from vmmkit.registry import Registries
from vmmkit.transport import DeviceHost, Transport

MIB = 1 << 20
LAYOUT = MemoryLayout(
    ram=(MemoryRange(0, 4 * MIB),),
    device_mmio=MemoryRange(0xD000_0000, 0x10_0000),
    pci_mmio32=MemoryRange(0xC000_0000, 0x1000_0000),
    pci_ecam=MemoryRange(0xE800_0000, 0x1000_0000),
    pio=MemoryRange(0x1000, 0xF000),
)


class RecordingVm:
    """The parts of a Vm the manager touches for these devices."""

    supports_ioeventfd = False
    supports_irqfd = False

    def __init__(self) -> None:
        self.sinks: dict[int, PortSink] = {}
        self.lines: list[tuple[int, bool]] = []

    def add_port_sink(self, sink: PortSink) -> bool:
        self.sinks[sink.port] = sink
        return True

    def remove_port_sink(self, port: int) -> None:
        del self.sinks[port]

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self.lines.append((gsi, level))


class Leds(Device):
    kind: ClassVar[str] = "leds"

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.closed = False
        self.update: NativePortsUpdate | None = None

    def read(self, offset: int, size: int) -> bytes:
        return b"\x2a" * size

    def write(self, offset: int, data: bytes) -> None:
        pass

    def port_sinks(self) -> Sequence[PortSink]:
        return (PortSink(1, fd=-1),)

    def bind_native_ports(self, update: NativePortsUpdate) -> None:
        self.update = update

    def close(self) -> None:
        self.closed = True


class Watchdog(PciFunction):
    """A non-virtio PCI function with one memory BAR, as a plugin would write one."""

    kind: ClassVar[str] = "test-watchdog"

    def __init__(self, name: str) -> None:
        config = PciConfigSpace(vendor_id=0x8086, device_id=0x25AB, class_code=0x08, subclass=0x80)
        config.add_bar(PciBar(0, 0x1000, BarKind.MEM32))
        super().__init__(name, config)
        self.writes: list[tuple[int, bytes]] = []

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return b"\x11" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))

    def placement_properties(self) -> Mapping[str, Any]:
        return {"model": "i6300esb-like"}


class LedsType(DeviceType):
    name: ClassVar[str] = "leds"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Leds:
        return Leds(request.id)


class WatchdogType(DeviceType):
    name: ClassVar[str] = "test-watchdog"

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Watchdog:
        return Watchdog(request.id)


class Mailbox(Device):
    """A device of a family only a plugin's transport places."""

    transport_family: ClassVar[str] = "mailbox"

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class MailboxTransport(Transport):
    """A plugin's transport: puts a mailbox at the next free 4 KiB of the device window."""

    name: ClassVar[str] = "mailbox-mmio"
    family: ClassVar[str] = "mailbox"
    placed: ClassVar[list[str]] = []

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        base = host.mmio_allocator.allocate(0x1000, 0x1000)
        host.mmio_bus.insert(device, base, 0x1000)
        self.placed.append(request.id)
        return PlacedDevice(device, request, "mailbox", mmio=(base, 0x1000), transport=self.name)

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        assert placed.mmio is not None
        host.mmio_bus.remove(placed.mmio[0])
        host.mmio_allocator.free(placed.mmio[0])


class MailboxPlugin:
    @hookimpl
    def vmmkit_register_transports(self, registry: Any) -> None:
        registry.add(MailboxTransport)

    @hookimpl
    def vmmkit_register_devices(self, registry: Any) -> None:
        registry.add(LedsType)
        registry.add(WatchdogType)


def make_manager(registries: Registries | None = None) -> DeviceManager:
    return DeviceManager(
        vm=RecordingVm(),  # type: ignore[arg-type]
        memory=GuestMemory.allocate(LAYOUT.ram), layout=LAYOUT, config=VmConfig(),
        event_loop=EventLoop(), registries=registries or Registries(),
        context=None,  # type: ignore[arg-type]  # the types here take nothing from it
        virtio_transport="pci",
    )


@pytest.fixture
def manager() -> Iterator[DeviceManager]:
    registries = collect_registries(make_plugin_manager(autoload=False, plugins=[MailboxPlugin()]))
    manager = make_manager(registries)
    yield manager
    manager.close()
    manager.event_loop.close()
    manager.memory.close()


def test_a_platform_device_with_its_native_ports(manager: DeviceManager) -> None:
    placed = manager.create(DeviceRequest("leds", "leds0", pio=(0x510, 2), irq=7))
    assert placed is not None and placed.transport == "platform" and placed.kind == "leds"
    assert manager.pio_bus.read(0x511, 1) == b"\x2a"
    vm: RecordingVm = manager.vm  # type: ignore[assignment]
    assert set(vm.sinks) == {0x511}  # the static sink, at the device's base
    device: Leds = placed.device
    assert device.update is not None
    device.update([PortSink(0, fd=-1)])  # the device changes its native set
    assert set(vm.sinks) == {0x511, 0x510}
    manager.remove("leds0")
    assert device.closed and manager.pio_bus.read(0x510, 1) is None
    assert 0x510 not in vm.sinks
    with pytest.raises(DeviceError, match="needs port I/O"):
        no_ports = make_manager()
        no_ports.layout = attrs.evolve(LAYOUT, pio=None)
        no_ports.place(Leds("x"), DeviceRequest("leds", "x", pio=(0x600, 1)))


def test_overlapping_placements_are_refused(manager: DeviceManager) -> None:
    manager.create(DeviceRequest("leds", "a", pio=(0x510, 2)))
    with pytest.raises(BusError):
        manager.create(DeviceRequest("leds", "b", pio=(0x511, 2)))
    assert [p.id for p in manager.devices] == ["a"]


def test_a_plugins_own_pci_function(manager: DeviceManager) -> None:
    placed = manager.create(DeviceRequest("test-watchdog", "wdt", pci_slot=5))
    assert placed is not None and placed.transport == "pci" and placed.kind == "test-watchdog"
    assert placed.properties["bdf"] == "0000:00:05.0" and placed.properties["model"] == "i6300esb-like"
    base, size = placed.properties["bars"][0]
    assert size == 0x1000 and LAYOUT.pci_mmio32.contains(base)  # type: ignore[union-attr]
    assert manager.mmio_bus.read(base, 4) == b"\x11" * 4
    assert [p.kind for p in manager.devices] == ["pci-host", "test-watchdog"]
    root = manager.pci_segment()
    assert root.functions[5] is placed.device and root.intx_routes() == ((5, 1, placed.irq),)
    manager.remove("wdt")
    assert 5 not in root.functions and manager.mmio_bus.read(base, 4) is None
    again = manager.create(DeviceRequest("test-watchdog", "wdt2"))
    assert again is not None and again.properties["bars"][0] == (base, size)  # the window is free again


def test_a_plugins_transport(manager: DeviceManager) -> None:
    placed = manager.place(Mailbox("mb"), DeviceRequest("mailbox", "mb"))
    assert placed.transport == "mailbox-mmio" and MailboxTransport.placed == ["mb"]
    assert placed.mmio == (LAYOUT.device_mmio.start, 0x1000)
    manager.remove("mb")
    assert manager.place(Mailbox("mb2"), DeviceRequest("mailbox", "mb2")).mmio == placed.mmio


def test_no_transport_for_a_family() -> None:
    manager = make_manager()  # no plugin: the core's transports only
    with pytest.raises(DeviceError, match="no transport places 'mailbox' devices"):
        manager.place(Mailbox("mb"), DeviceRequest("mailbox", "mb"))


def test_a_device_type_nobody_registered(manager: DeviceManager) -> None:
    with pytest.raises(DeviceError, match=r"no installed plugin provides device type 'tpm' \(installed types: "
                                          r"leds, test-watchdog\)"):
        manager.create(DeviceRequest("tpm", "tpm0"))


def test_something_that_is_no_device(manager: DeviceManager) -> None:
    with pytest.raises(DeviceError, match="cannot be placed"):
        manager.place(object(), DeviceRequest("x", "x"))


def test_the_core_modules_import_alone() -> None:
    """The machine, the virtio-mmio placement and virtio-pci no longer import each other."""
    modules = ("vmmkit.machine", "vmmkit.virtio.transport", "vmmkit.pci.virtio")
    for module in modules:
        code = f"import sys, {module}; print(sorted(m for m in {modules!r} if m in sys.modules))"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == repr([module]), (module, result.stdout)


def test_a_plugin_device_of_an_unregistered_type_is_refused_before_anything_is_built() -> None:
    from vmmkit.config import ConfigError, PluginDeviceConfig
    from vmmkit.device import check_devices

    registries = collect_registries(make_plugin_manager(autoload=False, plugins=[MailboxPlugin()]))
    config = VmConfig(plugin_devices=(PluginDeviceConfig.parse("tpm-crb", "path=/x"),)).assign_ids()
    with pytest.raises(ConfigError, match=r"plugin_devices\[0\].type: no installed plugin provides device type "
                                          r"'tpm-crb' \(expected an installed device type: leds, test-watchdog\)"):
        check_devices(config, registries.devices)
    with pytest.raises(ConfigError, match="--tpm-crb: no installed plugin"):
        check_devices(config, registries.devices, cli=True)
