"""Transports: how the device manager puts a device where the guest can reach it.

A transport is registered by :attr:`Transport.name` (the core registers ``platform``, ``pci``,
``virtio-mmio`` and ``virtio-pci``; a plugin adds more through ``vmmkit_register_transports``)
and places the devices of one :attr:`Transport.family`: a device's
:attr:`~vmmkit.device.ManagedDevice.transport_family` says which. A request picks a transport
of that family by name or :attr:`Transport.alias` (``DeviceRequest.transport``); without one
the device manager uses the family's default (for ``virtio``, the VM's virtio transport).

A transport works only through the :class:`DeviceHost` it is given (the device manager): the
buses, the allocators, the PCI segments. It returns a :class:`~vmmkit.device.PlacedDevice` and
takes it off the buses again in :meth:`Transport.remove`. Keep a transport class light: import
its implementation inside :meth:`Transport.place`, since every start registers every transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vmmkit.errors import DeviceError

if TYPE_CHECKING:
    from vmmkit.allocator import AddressAllocator
    from vmmkit.arch import MemoryLayout
    from vmmkit.bus import Bus
    from vmmkit.config import VmConfig
    from vmmkit.device import Device, DeviceRequest, PlacedDevice
    from vmmkit.eventloop import EventLoop
    from vmmkit.hypervisor import Vm
    from vmmkit.irq import InterruptLine
    from vmmkit.memory import GuestMemory
    from vmmkit.pci.host import PciRoot


class DeviceHost(Protocol):
    """What a transport uses of the device manager."""

    @property
    def vm(self) -> Vm: ...

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def layout(self) -> MemoryLayout: ...

    @property
    def config(self) -> VmConfig: ...

    @property
    def event_loop(self) -> EventLoop: ...

    @property
    def pio_bus(self) -> Bus: ...

    @property
    def mmio_bus(self) -> Bus: ...

    @property
    def mmio_allocator(self) -> AddressAllocator:
        """The window for MMIO devices the manager places (``layout.device_mmio``)."""
        ...

    @property
    def mmio64_allocator(self) -> AddressAllocator | None:
        """The 64-bit device window (``layout.pci_mmio64``), shared by 64-bit PCI BARs and
        device memory (:mod:`vmmkit.device_memory`); ``None``: the layout has none."""
        ...

    def allocate_irq(self, irq: int | None = None) -> tuple[int, InterruptLine]:
        """A legacy interrupt line: ``irq`` (shared if in use) or a free one."""
        ...

    def release_irq(self, irq: int) -> None:
        """Give back one use of ``irq`` (from :meth:`allocate_irq`)."""
        ...

    def allocate_msi_gsi(self) -> int | None:
        """A GSI for an MSI route; ``None`` when none is left."""
        ...

    def release_msi_gsi(self, gsi: int) -> None:
        """Give back a GSI from :meth:`allocate_msi_gsi` (the device is going away)."""
        ...

    def pci_segment(self, index: int = 0) -> PciRoot:
        """PCI segment ``index``'s root complex, created (and placed) on first use."""
        ...

    def device_events(self, device_id: str) -> Callable[[str], None]:
        """What a transport calls with ``"activated"`` / ``"reset"`` for its device: the
        machine's ``virtio-device-*`` events."""
        ...

    def install_port_sinks(self, device: Device, base: int, key: str) -> None:
        """Offer the backend the ports ``device`` (at port ``base``) may have served natively."""
        ...

    def withdraw_port_sinks(self, key: str) -> None: ...


class Transport(ABC):
    """Places devices of one :attr:`family` on the VM's buses. Instantiated once per VM."""

    name: ClassVar[str]
    family: ClassVar[str]
    #: The short name a request or ``--platform virtio_transport=`` may use (``"mmio"``).
    alias: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    #: Whether its devices may be added while the guest runs (PCI slots with ACPI hotplug: a
    #: placement that sets ``properties["slot"]``).
    hotpluggable: ClassVar[bool] = False

    @classmethod
    def preload(cls) -> None:
        """Import what :meth:`place` runs (the API calls it at ``vm.create``)."""

    @abstractmethod
    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        """Put ``device`` on the buses; raise :class:`vmmkit.errors.DeviceError` if it cannot
        be placed (and leave nothing behind)."""

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        """Take ``placed`` off the buses and give back what :meth:`place` allocated (the device
        manager closes the device afterwards)."""
        raise DeviceError(f"device {placed.id}: the {self.name} transport cannot remove devices")


class PlatformTransport(Transport):
    """A bus device at the fixed port and/or MMIO range its request names (serial, RTC...)."""

    name: ClassVar[str] = "platform"
    family: ClassVar[str] = "platform"
    description: ClassVar[str] = "fixed port-I/O and MMIO ranges"

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        from vmmkit.device import Device, PlacedDevice

        if not isinstance(device, Device):
            raise DeviceError(f"device {request.id} ({request.type}): a platform device must be a "
                              f"vmmkit.device.Device, not {type(device).__name__}")
        if request.pio is None and request.mmio is None:
            raise DeviceError(f"device {request.id} ({request.type}) has no placement (no pio or mmio range)")
        if request.pio is not None and host.layout.pio is None:
            raise DeviceError(f"device {request.id} ({request.type}) needs port I/O, which this "
                              "architecture does not have")
        if request.pio is not None:
            host.pio_bus.insert(device, *request.pio)
        if request.mmio is not None:
            try:
                host.mmio_bus.insert(device, *request.mmio)
            except BaseException:
                if request.pio is not None:
                    host.pio_bus.remove(request.pio[0])
                raise
        if request.pio is not None:
            host.install_port_sinks(device, request.pio[0], request.id)
        return PlacedDevice(device, request, device.kind or request.type, pio=request.pio, mmio=request.mmio,
                            irq=request.irq, properties=dict(device.firmware_properties()),
                            transport=self.name)

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        host.withdraw_port_sinks(placed.id)
        if placed.pio is not None:
            host.pio_bus.remove(placed.pio[0])
        if placed.mmio is not None:
            host.mmio_bus.remove(placed.mmio[0])


class PciTransport(Transport):
    """A :class:`vmmkit.pci.PciFunction` in a slot of a PCI segment's bus 0, its BARs in the
    segment's windows, INTA on a shared line (``config.pci_segment`` / ``pci_device_id``)."""

    name: ClassVar[str] = "pci"
    family: ClassVar[str] = "pci"
    description: ClassVar[str] = "a function on PCI bus 0 of a segment"
    hotpluggable: ClassVar[bool] = True

    @classmethod
    def preload(cls) -> None:
        import vmmkit.pci.host  # noqa: F401

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        from vmmkit.pci.host import place_function

        return place_function(host, device, request, transport=self.name)

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        from vmmkit.pci.host import remove_function

        remove_function(host, placed)


class VirtioMmio(Transport):
    """A :class:`vmmkit.virtio.VirtioDevice` behind a virtio-mmio (v2) window of 4 KiB."""

    name: ClassVar[str] = "virtio-mmio"
    family: ClassVar[str] = "virtio"
    alias: ClassVar[str | None] = "mmio"
    description: ClassVar[str] = "virtio over MMIO (virtio 1.2, 4.2)"

    @classmethod
    def preload(cls) -> None:
        import vmmkit.virtio.transport  # noqa: F401

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        from vmmkit.virtio.transport import place_virtio_mmio

        return place_virtio_mmio(host, device, request, transport=self.name)

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        from vmmkit.virtio.transport import remove_virtio_mmio

        remove_virtio_mmio(host, placed)


class VirtioPci(Transport):
    """A :class:`vmmkit.virtio.VirtioDevice` as a modern virtio-pci function."""

    name: ClassVar[str] = "virtio-pci"
    family: ClassVar[str] = "virtio"
    alias: ClassVar[str | None] = "pci"
    description: ClassVar[str] = "virtio over PCI (virtio 1.2, 4.1)"
    hotpluggable: ClassVar[bool] = True

    @classmethod
    def preload(cls) -> None:
        import vmmkit.pci.virtio  # noqa: F401

    def place(self, host: DeviceHost, device: Any, request: DeviceRequest) -> PlacedDevice:
        from vmmkit.pci.virtio import place_virtio_pci

        return place_virtio_pci(host, device, request, transport=self.name)

    def remove(self, host: DeviceHost, placed: PlacedDevice) -> None:
        from vmmkit.pci.host import remove_function

        remove_function(host, placed)


#: The transports every VM has, registered by the core itself.
BUILTIN_TRANSPORTS: tuple[type[Transport], ...] = (PlatformTransport, PciTransport, VirtioPci, VirtioMmio)
