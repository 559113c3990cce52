"""The device manager: the one owner of a VM's buses, allocators, PCI segments and devices.

It builds devices from the device registry (:meth:`DeviceManager.create`), places them through
the transport their family and request select (:mod:`vmmkit.transport`), and removes them
again (:meth:`DeviceManager.remove`), at boot and while the VM runs. Nothing else puts a
device on a bus. Cloud Hypervisor's ``DeviceManager`` does the same job but names every device
type; this one iterates registries, so adding a device or a transport never edits it.

Threads: :meth:`create`, :meth:`place` and :meth:`remove` may come from the API thread while
vCPUs run; the buses publish their ranges atomically (:mod:`vmmkit.bus`) and the manager's own
tables are guarded by one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from vmmkit.allocator import AddressAllocator
from vmmkit.bus import Bus
from vmmkit.device import Device, DeviceContext, DeviceRequest, ManagedDevice, PlacedDevice
from vmmkit.device_memory import DeviceMemory
from vmmkit.errors import DeviceError
from vmmkit.irq import GsiAllocator, GsiLine, InterruptLine
from vmmkit.log import get_logger
from vmmkit.memory import MemoryRange
from vmmkit.transport import Transport
from vmmkit.virtio.device import VirtioDevice

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.cpu_hotplug import CpuHotplugController, EjectHandler
    from vmmkit.eventloop import EventLoop
    from vmmkit.hypervisor import PortSink, Vm
    from vmmkit.memory import GuestMemory
    from vmmkit.pci.host import PciRoot
    from vmmkit.pci.hotplug import PciHotplugController
    from vmmkit.registry import Registries

log = get_logger()

#: The family whose default transport is the VM's virtio transport.
VIRTIO_FAMILY = "virtio"


def default_virtio_transport(config: VmConfig, architecture_default: str) -> str:
    """The VM's virtio transport: ``--platform virtio_transport=`` if given, else the
    architecture's default. The one place that decides it."""
    chosen = config.platform.virtio_transport if config.platform is not None else None
    return chosen or architecture_default


class DeviceManager:
    """The buses, allocators, PCI segments and placed devices of one VM.

    :param vm: the backend's VM (interrupt lines, ioeventfds, port sinks).
    :param memory: guest RAM, for devices that do DMA.
    :param layout: where device windows and interrupt ranges are.
    :param config: the VM configuration.
    :param event_loop: where devices serve their fds.
    :param registries: device types and transports.
    :param context: what device types get in :meth:`vmmkit.device.DeviceType.create`.
    :param virtio_transport: the default transport of virtio devices (name or alias).
    :param emit: the machine's event reporting, ``emit(event, **properties)``.
    """

    def __init__(
        self,
        *,
        vm: Vm,
        memory: GuestMemory,
        layout: MemoryLayout,
        config: VmConfig,
        event_loop: EventLoop,
        registries: Registries,
        context: DeviceContext,
        virtio_transport: str,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self.vm = vm
        self.memory = memory
        self.layout = layout
        self.config = config
        self.event_loop = event_loop
        self.registries = registries
        self.context = context
        self.virtio_transport = virtio_transport
        self._emit = emit
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        window = layout.device_mmio
        self.mmio_allocator = AddressAllocator(window.start, window.size, "device MMIO window")
        #: The 64-bit device window (``layout.pci_mmio64``, segment 0's share of it with several
        #: PCI segments): segment 0's 64-bit BARs and device memory.
        self.mmio64_allocator = _window_allocator(segment_windows(layout, 0, self.pci_segment_count).mmio64,
                                                  "64-bit device window")
        self.device_memory = DeviceMemory(vm, self.mmio64_allocator)
        first, last = layout.device_irqs
        self._free_irqs = list(range(first, last + 1))
        self._irq_lines: dict[int, GsiLine] = {}
        self._irq_uses: dict[int, int] = {}
        self._msi_gsis = GsiAllocator(*layout.msi_gsis)
        self._segments: dict[int, PciRoot] = {}
        self._placed: dict[str, PlacedDevice] = {}
        self._transports: dict[str, Transport] = {}
        self._native_ports: dict[str, dict[int, PortSink]] = {}
        self._hotplug: PciHotplugController | None = None
        self.cpu_hotplug: CpuHotplugController | None = None
        #: Removals the guest has been asked for, by (segment, slot): (device id, done).
        self._ejecting: dict[tuple[int, int], tuple[str, threading.Event]] = {}
        self._lock = threading.RLock()

    # -- devices ---------------------------------------------------------------------------------

    @property
    def devices(self) -> list[PlacedDevice]:
        """The placed devices, in the order they were placed."""
        with self._lock:
            return list(self._placed.values())

    def get(self, device_id: str) -> PlacedDevice:
        with self._lock:
            try:
                return self._placed[device_id]
            except KeyError:
                raise DeviceError(f"no device with id {device_id!r}") from None

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._placed

    def reserve_irqs(self, irqs: Iterable[int]) -> None:
        """Keep fixed interrupt lines (platform devices) out of the free pool."""
        fixed = set(irqs)
        with self._lock:
            self._free_irqs = [irq for irq in self._free_irqs if irq not in fixed]

    def create(self, request: DeviceRequest) -> PlacedDevice | None:
        """Build the device ``request`` asks for from the device registry and place it;
        ``None`` if its type declined (a serial port that is ``Off``)."""
        device = self._build(request)
        if device is None:
            return None
        try:
            return self.place(device, request)
        except BaseException:
            _guarded(request.id, "close", device.close)
            raise

    def _build(self, request: DeviceRequest) -> Any:
        if request.type not in self.registries.devices:
            installed = ", ".join(self.registries.devices.names()) or "none"
            raise DeviceError(f"device {request.id}: no installed plugin provides device type "
                              f"{request.type!r} (installed types: {installed})")
        self._check_new_id(request.id)
        return self.registries.devices.get(request.type).create(self.context, request)

    def place(self, device: Any, request: DeviceRequest) -> PlacedDevice:
        """Place a built device through its transport and record it."""
        self._check_new_id(request.id)
        transport = self.transport_for(device, request)
        placed = transport.place(self, device, request)
        with self._lock:
            self._placed[request.id] = placed
        log.debug("device.placed", id=request.id, type=request.type, transport=transport.name,
                  pio=placed.pio, mmio=placed.mmio, irq=placed.irq)
        return placed

    def remove(self, device_id: str) -> PlacedDevice:
        """Take a device off the buses, free what it was given, and close it."""
        placed = self.get(device_id)
        if device_id.startswith("_pci"):
            raise DeviceError(f"device {device_id} is a PCI root complex and cannot be removed")
        self._transport(placed.transport).remove(self, placed)
        with self._lock:
            del self._placed[device_id]
        _guarded(device_id, "close", placed.device.close)
        log.debug("device.removed", id=device_id, transport=placed.transport)
        return placed

    def resize(self, device_id: str, size: int) -> None:
        """Give a device (a disk) ``size`` bytes while the guest runs (``vm.resize-disk``)."""
        placed = self.get(device_id)
        if not isinstance(placed.device, ManagedDevice):
            raise DeviceError(f"device {device_id} cannot be resized")
        placed.device.resize(size)
        log.info("device.resized", id=device_id, size=size)

    def _check_new_id(self, device_id: str) -> None:
        if device_id in self._placed:
            raise DeviceError(f"a device with id {device_id!r} already exists")

    # -- transports ------------------------------------------------------------------------------

    def transport_for(self, device: Any, request: DeviceRequest) -> Transport:
        """The transport ``request`` names (by name or alias) among those of the device's
        family, else the family's default."""
        family = _family(device)
        candidates = [t for t in self.registries.transports if t.family == family]
        if not candidates:
            raise DeviceError(f"device {request.id}: no transport places {family!r} devices "
                              f"(installed transports: {', '.join(self.registries.transports.names())})")
        wanted = request.transport or (self.virtio_transport if family == VIRTIO_FAMILY else family)
        for candidate in candidates:
            if wanted in (candidate.name, candidate.alias):
                return self._transport(candidate.name)
        if request.transport is None and len(candidates) == 1:
            return self._transport(candidates[0].name)
        names = ", ".join(sorted(f"{t.name}" + (f" ({t.alias})" if t.alias else "") for t in candidates))
        raise DeviceError(f"device {request.id}: unknown {family} transport {wanted!r} (known: {names})")

    def _transport(self, name: str) -> Transport:
        with self._lock:
            transport = self._transports.get(name)
            if transport is None:
                transport = self._transports[name] = self.registries.transports.get(name)()
            return transport

    # -- interrupts ------------------------------------------------------------------------------

    def allocate_irq(self, irq: int | None = None) -> tuple[int, InterruptLine]:
        """A legacy interrupt line: ``irq`` if given (shared if already in use), else a free one."""
        with self._lock:
            if irq is None:
                if not self._free_irqs:
                    raise DeviceError("no free interrupt lines")
                irq = self._free_irqs.pop(0)
            elif irq in self._free_irqs:
                self._free_irqs.remove(irq)
            line = self._irq_lines.get(irq)
            if line is None:
                line = self._irq_lines[irq] = GsiLine(self.vm, irq)
            self._irq_uses[irq] = self._irq_uses.get(irq, 0) + 1
            return irq, line

    def release_irq(self, irq: int) -> None:
        """Give back one use of ``irq``; the last use frees the line for another device."""
        with self._lock:
            uses = self._irq_uses.get(irq, 0) - 1
            if uses > 0:
                self._irq_uses[irq] = uses
                return
            self._irq_uses.pop(irq, None)
            line = self._irq_lines.pop(irq, None)
            if line is not None:
                line.close()
            first, last = self.layout.device_irqs
            if first <= irq <= last and irq not in self._free_irqs:
                self._free_irqs.append(irq)
                self._free_irqs.sort()

    def allocate_msi_gsi(self) -> int | None:
        return self._msi_gsis.allocate()

    def release_msi_gsi(self, gsi: int) -> None:
        self._msi_gsis.free(gsi)

    # -- PCI -------------------------------------------------------------------------------------

    def pci_segment(self, index: int = 0) -> PciRoot:
        """The root complex of PCI segment ``index``, created and placed on first use."""
        with self._lock:
            root = self._segments.get(index)
            if root is not None:
                return root
            from vmmkit.pci.host import create_root

            root, placed = create_root(self, index, segment_windows(self.layout, index, self.pci_segment_count))
            self._segments[index] = root
            self._placed[placed.id] = placed
            return root

    @property
    def pci_segments(self) -> dict[int, PciRoot]:
        return dict(self._segments)

    @property
    def pci_segment_count(self) -> int:
        """``--platform num_pci_segments`` (1 without)."""
        platform = self.config.platform
        return platform.num_pci_segments if platform is not None else 1

    # -- PCI hotplug (ACPI, as Cloud Hypervisor: vmmkit.pci.hotplug) ----------------------------

    def enable_pci_hotplug(self) -> None:
        """Place the ACPI PCI hotplug registers where the layout says (``layout.pci_hotplug``;
        nothing without), and make segment 0 take hotplug when it exists or the VM's virtio
        devices go over PCI (it is created then, with all its INTx lines, since the ``_PRT``
        written at boot must route the empty slots). Called once the boot devices are placed."""
        window = self.layout.pci_hotplug
        if window is None or self._hotplug is not None:
            return
        from vmmkit.pci.hotplug import PciHotplugController

        if 0 in self._segments or self._virtio_over_pci() or self.pci_segment_count > 1:
            for index in range(self.pci_segment_count):  # every segment in the DSDT, empty or not
                root = self.pci_segment(index)
                root.hotplug = True
                root.reserve_intx_lines(self.allocate_irq)
        controller = PciHotplugController(
            "_pci_hotplug", segments=lambda: [index for index, root in self._segments.items() if root.hotplug],
            on_eject=self._ejected)
        request = DeviceRequest("pci-hotplug", "_pci_hotplug", mmio=(window.start, window.size))
        self.place(controller, request)
        self._hotplug = controller

    def _virtio_over_pci(self) -> bool:
        from vmmkit.transport import VirtioPci

        return self.virtio_transport in (VirtioPci.name, VirtioPci.alias)

    def _hotplug_target(self, segment: int) -> tuple[PciHotplugController, PciRoot, list[ManagedDevice]]:
        """The controller, the root of ``segment`` and the devices that notify the guest, or
        a DeviceError saying why this VM cannot hotplug there."""
        controller = self._hotplug
        if controller is None:
            raise DeviceError("this VM has no PCI hotplug controller (the architecture has no ACPI PCI hotplug)")
        root = self._segments.get(segment)
        if root is None or not root.hotplug:
            raise DeviceError(f"PCI segment {segment} does not take hotplug (this VM's virtio devices use "
                              f"{self.virtio_transport}; hotplug needs --platform virtio_transport=pci)")
        notifiers = [p.device for p in self.devices
                     if isinstance(p.device, ManagedDevice) and p.device.handles_pci_hotplug_notification]
        if not notifiers:
            raise DeviceError("this VM has no device that tells the guest about PCI hotplug (an ACPI GED)")
        return controller, root, notifiers

    def hotplug(self, request: DeviceRequest) -> PlacedDevice:
        """Build and place a device while the guest runs, in a free slot of a hotplug PCI
        segment, and tell the guest (PCIU, then the GED's interrupt). Only devices a PCI
        transport places can come this way."""
        controller, root, notifiers = self._hotplug_target(request.pci_segment)
        device = self._build(request)
        if device is None:
            raise DeviceError(f"device {request.id} ({request.type}) was declined by its device type")
        try:
            transport = self.transport_for(device, request)
            if not transport.hotpluggable:
                raise DeviceError(f"device {request.id} ({request.type}) goes on transport {transport.name}; "
                                  "only PCI devices can be added while the VM runs")
            placed = self.place(device, request)
        except BaseException:
            _guarded(request.id, "close", device.close)
            raise
        controller.device_added(root.segment, int(placed.properties["slot"]))
        for notifier in notifiers:
            notifier.notify_pci_devices_changed()
        log.info("device.hotplugged", id=request.id, bdf=placed.properties.get("bdf"))
        return placed

    def unplug(self, device_id: str) -> threading.Event:
        """Ask the guest to eject a hot-pluggable PCI device (PCID, then the GED's interrupt).
        The device stays until the guest's ``_EJ0`` writes B0EJ; the event returned is set
        once it is gone. Asking again for the same device notifies the guest again."""
        placed = self.get(device_id)
        if "slot" not in placed.properties:
            raise DeviceError(f"device {device_id} ({placed.kind}) is not a PCI device: only PCI devices can "
                              "be removed while the VM runs")
        segment, slot = int(placed.properties.get("segment", 0)), int(placed.properties["slot"])
        controller, _root, notifiers = self._hotplug_target(segment)
        with self._lock:
            pending = self._ejecting.get((segment, slot))
            if pending is None:
                pending = self._ejecting[(segment, slot)] = (device_id, threading.Event())
        controller.removal_requested(segment, slot)
        for notifier in notifiers:
            notifier.notify_pci_devices_changed()
        log.info("device.unplug_requested", id=device_id, bdf=placed.properties.get("bdf"))
        return pending[1]

    def _ejected(self, segment: int, slot: int) -> None:
        """The guest ejected ``slot`` (B0EJ, on its vCPU thread): the function leaves the bus
        now, its slot, BARs and interrupt are free, ``vm``/``device-removed`` is reported."""
        with self._lock:
            pending = self._ejecting.pop((segment, slot), None)
            device_id = pending[0] if pending is not None else None
            if device_id is None:  # the guest ejects on its own (an eject from inside)
                device_id = next((p.id for p in self._placed.values()
                                  if p.properties.get("slot") == slot and p.properties.get("segment", 0) == segment),
                                 None)
        if device_id is None:
            log.warning("pci_hotplug.eject_empty_slot", segment=segment, slot=slot)
            return
        placed = self.remove(device_id)
        if self._emit is not None:
            self._emit("vm-device-removed", id=device_id, bdf=placed.properties.get("bdf"))
        if pending is not None:
            pending[1].set()

    def _finish_ejections(self) -> None:
        """A reset: the guest will not eject what it was asked to; the devices go now."""
        with self._lock:
            pending = list(self._ejecting)
        for segment, slot in pending:
            self._ejected(segment, slot)

    # -- vCPU hotplug (ACPI, as Cloud Hypervisor: vmmkit.cpu_hotplug) ---------------------------

    def enable_cpu_hotplug(self, *, present: int, processor_entries: Sequence[bytes],
                           on_eject: EjectHandler) -> CpuHotplugController | None:
        """Place the ACPI CPU hotplug registers where the layout says (``layout.cpu_hotplug``;
        nothing without): ``present`` vCPUs of ``len(processor_entries)`` possible ones."""
        window = self.layout.cpu_hotplug
        if window is None or self.cpu_hotplug is not None:
            return self.cpu_hotplug
        from vmmkit.cpu_hotplug import CpuHotplugController

        controller = CpuHotplugController("_cpu_hotplug", present=present, processor_entries=processor_entries,
                                          on_eject=on_eject)
        self.place(controller, DeviceRequest("cpu-hotplug", "_cpu_hotplug", mmio=(window.start, window.size)))
        self.cpu_hotplug = controller
        return controller

    def notify_cpus_changed(self) -> None:
        """Raise the vCPU hotplug notification (the GED's CPU bit and interrupt).

        :raises DeviceError: no device of this VM tells the guest about vCPU hotplug."""
        notifiers = [p.device for p in self.devices
                     if isinstance(p.device, ManagedDevice) and p.device.handles_cpu_hotplug_notification]
        if not notifiers:
            raise DeviceError("this VM has no device that tells the guest about vCPU hotplug (an ACPI GED)")
        for notifier in notifiers:
            notifier.notify_cpu_devices_changed()

    # -- events ----------------------------------------------------------------------------------

    def device_events(self, device_id: str) -> Callable[[str], None]:
        emit = self._emit

        def report(event: str) -> None:
            if emit is not None:
                emit(f"virtio-device-{event}", id=device_id)

        return report

    # -- native port sinks -----------------------------------------------------------------------

    def install_port_sinks(self, device: Device, base: int, key: str) -> None:
        for sink in device.port_sinks():
            served = self.vm.add_port_sink(attrs.evolve(sink, port=base + sink.port))
            device.native_path_changed(sink.port, served)
        device.bind_native_ports(lambda sinks: self._update_port_sinks(sinks, base=base, key=key))

    def withdraw_port_sinks(self, key: str) -> None:
        for port in self._native_ports.pop(key, {}):
            self.vm.remove_port_sink(port)

    def _update_port_sinks(self, sinks: Sequence[PortSink], *, base: int, key: str) -> bool:
        """A device changed which of its ports the backend may serve natively (the serial
        port while it is in its plain state). Called under the device's lock: take no other."""
        installed = self._native_ports.setdefault(key, {})
        wanted = {base + sink.port: attrs.evolve(sink, port=base + sink.port) for sink in sinks}
        for port in [port for port, sink in installed.items() if wanted.get(port) != sink]:
            self.vm.remove_port_sink(port)
            del installed[port]
        served = True
        for port, sink in wanted.items():
            if port not in installed:
                if self.vm.add_port_sink(sink):
                    installed[port] = sink
                else:
                    served = False
        return served

    # -- every device at once --------------------------------------------------------------------

    def reset(self) -> None:
        self._finish_ejections()
        for placed in self.devices:
            _guarded(placed.id, "reset", placed.device.reset)

    def pause(self) -> None:
        for placed in self.devices:
            _guarded(placed.id, "pause", placed.device.pause)

    def resume(self) -> None:
        for placed in self.devices:
            _guarded(placed.id, "resume", placed.device.resume)

    def counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for placed in self.devices:
            values = _guarded(placed.id, "counters", placed.device.counters)
            if values:
                out[placed.id] = dict(values)
        return out

    def power_buttons(self) -> list[ManagedDevice]:
        return [p.device for p in self.devices if isinstance(p.device, ManagedDevice) and p.device.handles_power_button]

    def close(self) -> None:
        """Close every device and release the interrupt lines (the VM is going away)."""
        for placed in self.devices:
            _guarded(placed.id, "close", placed.device.close)
        with self._lock:
            self._placed.clear()
            for line in self._irq_lines.values():
                line.close()
            self._irq_lines.clear()


@attrs.frozen
class SegmentWindows:
    """One segment's share of the layout's PCI windows."""

    ecam: MemoryRange | None
    mmio32: MemoryRange | None
    mmio64: MemoryRange | None
    io: MemoryRange | None


#: A share of a window is a whole number of these (1 MiB: an ECAM bus, and BAR-friendly).
_SHARE_ALIGN = 1 << 20


def segment_windows(layout: MemoryLayout, segment: int, count: int) -> SegmentWindows:
    """The windows of ``segment`` when the layout's PCI windows are shared by ``count``
    segments (``--platform num_pci_segments``): the ECAM, 32-bit and 64-bit MMIO windows cut in
    ``count`` equal parts, in segment order, as Cloud Hypervisor divides its apertures (with
    equal weights); the I/O window and the 0xCF8 ports stay segment 0's. One segment keeps the
    whole windows."""
    if not 0 <= segment < count:
        raise DeviceError(f"PCI segment {segment} does not exist (num_pci_segments is {count})")

    def share(window: MemoryRange | None) -> MemoryRange | None:
        if window is None or count == 1:
            return window
        size = window.size // count & ~(_SHARE_ALIGN - 1)
        return MemoryRange(window.start + segment * size, size) if size else None

    return SegmentWindows(ecam=share(layout.pci_ecam), mmio32=share(layout.pci_mmio32),
                          mmio64=share(layout.pci_mmio64), io=layout.pio if segment == 0 else None)


def _window_allocator(window: MemoryRange | None, name: str) -> AddressAllocator | None:
    return AddressAllocator(window.start, window.size, name) if window is not None and window.size > 0 else None


def _family(device: Any) -> str:
    """Which transport family places ``device``: declared on every kind of device there is."""
    if isinstance(device, (ManagedDevice, VirtioDevice)):
        return device.transport_family
    raise DeviceError(f"{type(device).__name__} cannot be placed: a device must be a vmmkit.device.Device, "
                      "a vmmkit.virtio.VirtioDevice or a vmmkit.pci.PciFunction")


def _guarded(device_id: str, action: str, call: Callable[[], Any]) -> Any:
    """Run a device's lifecycle call; a device that fails it is logged, never fatal."""
    try:
        return call()
    except Exception:
        log.exception("device.call_failed", id=device_id, method=action)
        return None
