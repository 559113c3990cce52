"""Device types and the context a device is built in.

A device type (registered by a plugin) turns part of the VM configuration into devices.
A device sees only ``(offset, bytes)`` on its own bus range (see :mod:`vmmkit.bus`) and gets
everything else (guest memory, its interrupt line, the event loop, power callbacks) from the
:class:`DeviceContext` it is created with. It never sees the hypervisor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from attrs import field, frozen

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.device_memory import DeviceMemoryRegion
    from vmmkit.eventloop import EventLoop
    from vmmkit.firmware import AcpiScope, FdtWriter
    from vmmkit.hypervisor import Availability, PortSink
    from vmmkit.irq import InterruptLine
    from vmmkit.memory import GuestMemory
    from vmmkit.ratelimit import RateLimiter


@frozen
class DeviceRequest:
    """One device the VM should have: which type builds it, with what, and where.

    ``pio`` / ``mmio`` are fixed ``(base, size)`` placements (platform devices); ``None`` lets
    the device manager allocate. ``irq`` is a fixed legacy interrupt, ``None`` to allocate one
    if the device asks. ``transport`` names the transport (or its alias: ``"pci"`` or
    ``"mmio"`` for virtio devices); ``None``: the default of the device's family.
    ``pci_segment`` / ``pci_slot`` place a PCI function (``pci_device_id`` in Cloud
    Hypervisor's configuration); ``None`` slot: the lowest free one.
    """

    type: str
    id: str
    config: Any = None
    pio: tuple[int, int] | None = None
    mmio: tuple[int, int] | None = None
    irq: int | None = None
    transport: str | None = None
    pci_segment: int = 0
    pci_slot: int | None = None


class DeviceContext(Protocol):
    """What the machine gives a device type's :meth:`DeviceType.create`."""

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def config(self) -> VmConfig: ...

    @property
    def event_loop(self) -> EventLoop: ...

    def interrupt_line(self, irq: int | None = None) -> tuple[int, InterruptLine]:
        """A legacy interrupt line: ``irq`` if given, else a free one. Returns ``(irq, line)``."""
        ...

    def request_shutdown(self, reason: str) -> None:
        """The guest powered the machine off (or a device decided it must stop)."""
        ...

    def map_device_memory(self, host_address: int, size: int, *, alignment: int,
                          at: int | None = None) -> DeviceMemoryRegion:
        """Map ``size`` bytes of the device's host memory into the guest, outside RAM, at an
        ``alignment``-aligned range of the 64-bit device window (``at``: exactly there), with a
        hypervisor slot of its own (:mod:`vmmkit.device_memory`); the device unmaps it
        (:meth:`DeviceMemoryRegion.unmap`) before it unmaps the host memory.

        :raises DeviceError: no room, or the hypervisor refuses."""
        ...

    def request_reset(self, reason: str) -> None:
        """The guest asked for a reset."""
        ...

    def set_exit_status(self, status: int) -> None:
        """The status the VMM exits with once the guest powers off (test devices)."""
        ...

    def emit_event(self, name: str, **properties: Any) -> None:
        """Report an event (``guest-panic``, ...) to the machine's listeners (event monitor)."""
        ...

    def rate_limit_group(self, group_id: str) -> RateLimiter:
        """The limiter of rate limit group ``group_id`` (``--rate-limit-group``), one per group
        and VM, shared by every device that asks for it.

        :raises VmmError: the VM has no such group."""
        ...

    @property
    def log_fd(self) -> int | None:
        """Where natively served log ports (boot progress) write their timestamped lines:
        the VMM's log when info-level logging is on, else ``None`` (discard them)."""
        ...


NativePortsUpdate = Callable[[Sequence["PortSink"]], object]
"""What :meth:`Device.bind_native_ports` receives: called with the complete set of port sinks
(ports relative to the device's base) the backend should serve from then on; truthy when the
backend serves them."""


class ManagedDevice:
    """What the device manager does with every device it places, whatever its transport: the
    lifecycle, statistics, the power button, and the device's own description in the guest's
    firmware tables. Bus devices (:class:`Device`), PCI functions
    (:class:`vmmkit.pci.PciFunction`) and the PCI root all have it; override what applies.

    Firmware description: the architecture writes the tables and hands each placed device a
    writer for its format; the device adds its own node, so the guest's OS finds a device of
    any plugin without the architecture knowing its kind (Cloud Hypervisor's ``impl Aml``).
    """

    #: Names the device in logs, counters and events (``"serial-16550"``, ``"virtio-mmio"``).
    kind: ClassVar[str] = ""
    #: Which family of transports places it (:class:`vmmkit.transport.Transport.family`).
    transport_family: ClassVar[str] = "platform"
    #: True for a device that delivers the power-button event (:meth:`press_power_button`).
    handles_power_button: ClassVar[bool] = False
    #: True for a device that tells the guest PCI devices came or go
    #: (:meth:`notify_pci_devices_changed`: the ACPI GED).
    handles_pci_hotplug_notification: ClassVar[bool] = False
    #: True for a device that tells the guest memory was plugged or is to be unplugged
    #: (:meth:`notify_memory_devices_changed`: the ACPI GED).
    handles_memory_hotplug_notification: ClassVar[bool] = False
    #: True for a device that tells the guest vCPUs came or go
    #: (:meth:`notify_cpu_devices_changed`: the ACPI GED).
    handles_cpu_hotplug_notification: ClassVar[bool] = False

    def reset(self) -> None:
        """Return to power-on state (VM reboot)."""

    def pause(self) -> None:
        """Stop touching guest memory and raising interrupts until :meth:`resume`."""

    def resume(self) -> None: ...

    def close(self) -> None:
        """Release host resources (files, fds, threads)."""

    def counters(self) -> Mapping[str, int]:
        """Statistics for ``vm.counters``."""
        return {}

    def press_power_button(self) -> None:
        """Tell the guest its power button was pressed (only if :attr:`handles_power_button`)."""

    def resize(self, size: int) -> None:
        """``vm.resize-disk``: take ``size`` bytes (a virtio transport forwards it to its
        device). By default a device cannot be resized.

        :raises vmmkit.errors.DeviceError: it cannot.
        """
        from vmmkit.errors import DeviceError

        raise DeviceError(f"device {self.kind or type(self).__name__} cannot be resized")

    def notify_pci_devices_changed(self) -> None:
        """Tell the guest to rescan its hotplug PCI slots (only if
        :attr:`handles_pci_hotplug_notification`)."""

    def notify_memory_devices_changed(self) -> None:
        """Tell the guest to rescan its hotplug memory slots (only if
        :attr:`handles_memory_hotplug_notification`)."""

    def notify_cpu_devices_changed(self) -> None:
        """Tell the guest to rescan its hot-pluggable vCPUs (only if
        :attr:`handles_cpu_hotplug_notification`)."""

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """Add this device's node(s) to the DSDT through ``scope`` (ACPI platforms)."""

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """Add this device's node to the flattened device tree through ``fdt``."""


class Device(ManagedDevice, ABC):
    """A device placed on a bus (port I/O or MMIO), at the fixed place its request names."""

    def __init__(self, device_id: str) -> None:
        self.id = device_id

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes: ...

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    def firmware_properties(self) -> Mapping[str, Any]:
        """Extra facts recorded in the device's :attr:`PlacedDevice.properties`."""
        return {}

    # -- ports the backend may serve natively (in its run loop, without an exit to Python) ----

    def port_sinks(self) -> Sequence[PortSink]:
        """Port sinks (ports relative to the device's base) installed once at placement."""
        return ()

    def native_path_changed(self, port: int, served: bool) -> None:
        """Whether the backend took the sink of relative ``port`` (``False``: slow path)."""

    def bind_native_ports(self, update: NativePortsUpdate) -> None:
        """For a device whose native ports change with its state (a UART): keep ``update`` and
        call it with the complete set whenever it changes. Default: no such ports."""


class DeviceType(ABC):
    """A kind of device a plugin provides, registered by :attr:`name`.

    Built-in configuration sections (``disks``, ``net``, ``rng``...) are claimed by overriding
    :meth:`requests`. A third-party type can instead set :attr:`option`: the CLI then offers
    ``--<option> k=v,...`` (repeatable) and each use becomes a ``PluginDeviceConfig`` of this type
    in ``VmConfig.plugin_devices``, which the default :meth:`requests` turns into requests.

    Registration happens at every start for every type, so a type should be a light declaration:
    set :attr:`implementation` to the module whose ``create(ctx, request)`` builds the device, and
    that module is imported only when a VM has such a device (or ahead of a boot, by
    :meth:`preload`). Overriding :meth:`create` instead works too.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: The ``VmConfig`` sections this type consumes (``("disks",)``, ``("pmem",)``), or finer
    #: JSON paths without indices (``("disks.vhost_user",)``). A section or key that
    #: :data:`vmmkit.config.NOT_SUPPORTED` lists, or a device section no registered type names,
    #: is refused by name (:func:`vmmkit.config.check_supported`); naming it here lifts that.
    sections: ClassVar[tuple[str, ...]] = ()
    option: ClassVar[str | None] = None
    option_help: ClassVar[str] = ""
    implementation: ClassVar[str | None] = None

    @classmethod
    def requests(cls, config: VmConfig) -> Sequence[DeviceRequest]:
        """The devices of this type that ``config`` asks for."""
        return [DeviceRequest(cls.name, section_id(plugin_device), plugin_device)
                for plugin_device in config.plugin_devices if plugin_device.type == cls.name]

    @classmethod
    def create(cls, ctx: DeviceContext, request: DeviceRequest) -> Any:
        """Build the device: a :class:`Device` for a bus device, a
        :class:`vmmkit.virtio.VirtioDevice` or a :class:`vmmkit.pci.PciFunction`, which the
        device manager places through a transport of its :attr:`~ManagedDevice.transport_family`
        (``None``: the request is declined, e.g. a serial port with mode ``Off``). By default,
        ``create(ctx, request)`` of the :attr:`implementation` module.

        Raise :class:`vmmkit.errors.DeviceError` with a clear message when the configuration
        cannot be honoured (missing file, busy tap)."""
        if cls.implementation is None:
            raise NotImplementedError(f"device type {cls.name!r} sets no implementation and has no create()")
        return cls.preload().create(ctx, request)

    @classmethod
    def host_support(cls) -> Availability | None:
        """Whether this host has what the device type needs (VFIO: ``/dev/vfio``), for ``vmmkit
        plugins``; ``None`` (the default): nothing beyond the hypervisor. Cheap, no side effects."""
        return None

    @classmethod
    def preload(cls) -> Any:
        """Import the :attr:`implementation` module (returned; ``None`` without one), so a
        boot that follows pays no import. The API calls it at ``vm.create``."""
        if cls.implementation is None:
            return None
        import importlib

        return importlib.import_module(cls.implementation)


def section_id(section: Any) -> str:
    """The id of a configuration section (a disk, a plugin device): assigned once, when the
    configuration enters the VMM (``VmConfig.assign_ids``, which the Machine applies)."""
    device_id = section.id
    if not isinstance(device_id, str):
        raise TypeError(f"{type(section).__name__} has no id: the configuration did not go "
                        "through VmConfig.assign_ids()")
    return device_id


def claimed_sections(device_types: Iterable[type[DeviceType]]) -> frozenset[str]:
    """Every :attr:`DeviceType.sections` entry of ``device_types`` (a registry's device types)."""
    return frozenset(section for device_type in device_types for section in device_type.sections)


def check_devices(config: VmConfig, device_types: Iterable[type[DeviceType]], *, cli: bool = False) -> None:
    """Refuse a configuration that asks for a device no installed plugin provides: a section
    that is not supported yet and no device type claims (:func:`vmmkit.config.check_supported`),
    or a plugin device of a type nobody registered. What the CLI (exit 2), the API (400) and
    :meth:`vmmkit.machine.Machine.build` check before anything is allocated.

    :raises vmmkit.config.ConfigError: naming the option and, for a type, the installed ones.
    """
    from vmmkit.config import ConfigError, check_supported

    types = list(device_types)
    check_supported(config, claimed_sections(types), cli=cli)
    names = [device_type.name for device_type in types]
    for index, plugin_device in enumerate(config.plugin_devices):
        if plugin_device.type not in names:
            raise ConfigError(f"--{plugin_device.type}" if cli else f"plugin_devices[{index}].type",
                              plugin_device.type, f"an installed device type: {', '.join(names) or 'none'}",
                              reason=f"no installed plugin provides device type {plugin_device.type!r}")


@frozen
class PlacedDevice:
    """A device after placement: where it is and how the guest reaches it.

    ``transport`` names the :class:`vmmkit.transport.Transport` that placed it (and removes
    it); ``properties`` holds facts the transport records (a PCI function's ``bdf``).
    """

    device: Any
    request: DeviceRequest
    kind: str
    pio: tuple[int, int] | None = None
    mmio: tuple[int, int] | None = None
    irq: int | None = None
    properties: Mapping[str, Any] = field(factory=dict)
    transport: str = "platform"

    @property
    def id(self) -> str:
        return self.request.id


ResetCallback = Callable[[str], None]
