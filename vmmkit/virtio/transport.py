"""Putting a :class:`VirtioDevice` behind a transport: what ``Machine._place`` calls.

The transport is the request's ``transport`` (``"mmio"`` or ``"pci"``), else the VM's default
(``PlatformConfig.virtio_transport``, ``"pci"`` when unset).

``"mmio"``: a 4 KiB window allocated (4 KiB aligned) from ``machine.layout.device_mmio`` (or the
request's fixed ``mmio`` placement), a :class:`VirtioMmioTransport` inserted on the MMIO bus, a
legacy interrupt from ``machine.allocate_irq()``, and an ioeventfd per queue on the QueueNotify
register (``datamatch`` = queue index) where ``machine.vm.supports_ioeventfd``. The result is a
``PlacedDevice`` of kind ``"virtio-mmio"``, which the architecture describes to the guest
(``virtio_mmio.device=4K@<base>:<irq>`` on the x86-64 command line, an ACPI ``LNRO0005`` node).

``"pci"``: delegated to ``vmmkit.pci.virtio.attach_virtio_pci(machine, device, request)``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmmkit.allocator import AddressAllocator
from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.errors import BusError, DeviceError, VmmError
from vmmkit.log import get_logger
from vmmkit.virtio.device import VirtioDevice
from vmmkit.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, VirtioMmioTransport

if TYPE_CHECKING:
    from vmmkit.hypervisor import Vm
    from vmmkit.machine import Machine

log = get_logger()

TRANSPORTS = ("mmio", "pci")
#: The machine attribute holding the device-MMIO window's allocator (see :func:`device_mmio_allocator`).
ALLOCATOR_ATTRIBUTE = "device_mmio_allocator"
_ALLOCATOR_LOCK = threading.Lock()
_PLACEMENT_TRIES = 64


def attach_virtio(machine: Machine, device: VirtioDevice, request: DeviceRequest) -> PlacedDevice:
    """Put ``device`` behind the transport ``request`` (or the VM) asks for."""
    transport = request.transport or default_transport(machine.config, machine.arch)
    if transport == "mmio":
        return attach_virtio_mmio(machine, device, request)
    if transport == "pci":
        return _attach_virtio_pci(machine, device, request)
    raise DeviceError(f"device {request.id}: unknown virtio transport {transport!r} "
                      f"(known: {', '.join(TRANSPORTS)})")


def default_transport(config: Any, arch: Any = None) -> str:
    """The VM's default virtio transport: ``config.platform.virtio_transport``, else the
    architecture's default, else ``"pci"``."""
    platform = getattr(config, "platform", None)
    transport = getattr(platform, "virtio_transport", None)
    if isinstance(transport, str) and transport:
        return transport
    return str(getattr(arch, "default_virtio_transport", "pci"))


def device_event_emitter(machine: Any, device_id: str) -> Callable[[str], None] | None:
    """What a transport calls when its device is activated or reset: the machine's
    ``virtio-device-activated`` / ``virtio-device-reset`` events (the event monitor's shape);
    ``None`` for a machine without events."""
    machine_emit = getattr(machine, "emit", None)
    if machine_emit is None:
        return None

    def emit(event: str) -> None:
        machine_emit(f"virtio-device-{event}", id=device_id)

    return emit


def device_mmio_allocator(machine: Machine) -> AddressAllocator:
    """The allocator of ``machine.layout.device_mmio``, created on first use and kept on the
    machine (as ``machine.device_mmio_allocator``) so every device placed there shares it."""
    with _ALLOCATOR_LOCK:
        allocator: AddressAllocator | None = getattr(machine, ALLOCATOR_ATTRIBUTE, None)
        if allocator is None:
            if machine.layout is None:
                raise DeviceError("the machine has no memory layout yet")
            window = machine.layout.device_mmio
            allocator = AddressAllocator(window.start, window.size, "device MMIO window")
            setattr(machine, ALLOCATOR_ATTRIBUTE, allocator)
        return allocator


def attach_virtio_mmio(machine: Machine, device: VirtioDevice, request: DeviceRequest) -> PlacedDevice:
    if machine.memory is None or machine.vm is None:
        raise DeviceError(f"device {request.id}: the machine is not built (no memory or VM)")
    irq, line = machine.allocate_irq(request.irq)
    transport = VirtioMmioTransport(device, memory=machine.memory, line=line, event_loop=machine.event_loop)
    transport.core.on_event = device_event_emitter(machine, request.id)
    try:
        base, size = _place_window(machine, transport, request)
    except BaseException:
        transport.close()
        raise
    _register_ioeventfds(machine.vm, transport, base + QUEUE_NOTIFY)
    log.debug("virtio.mmio_attached", id=request.id, device_type=device.device_type, base=hex(base), irq=irq)
    return PlacedDevice(
        transport, request, VirtioMmioTransport.kind, mmio=(base, size), irq=irq,
        properties={"virtio_device_type": device.device_type},
    )


def _place_window(
    machine: Machine, transport: VirtioMmioTransport, request: DeviceRequest
) -> tuple[int, int]:
    allocator = device_mmio_allocator(machine)
    if request.mmio is not None:
        base, size = request.mmio
        if size < 0x200:
            raise DeviceError(f"device {request.id}: a virtio-mmio window needs at least 0x200 bytes")
        try:
            allocator.allocate(size, at=base)
        except BusError:
            pass  # outside the window (a fixed platform address) or taken: the bus decides
        machine.mmio_bus.insert(transport, base, size)
        return base, size
    # Ranges placed on the bus without the allocator (fixed platform devices) make a candidate
    # fail to insert; it stays reserved and the next one is tried.
    for _ in range(_PLACEMENT_TRIES):
        base = allocator.allocate(MMIO_SIZE, alignment=MMIO_SIZE)
        try:
            machine.mmio_bus.insert(transport, base, MMIO_SIZE)
        except BusError:
            continue
        return base, MMIO_SIZE
    raise DeviceError(f"device {request.id}: no free virtio-mmio window in the device MMIO range")


def _register_ioeventfds(vm: Vm, transport: VirtioMmioTransport, notify_address: int) -> None:
    if not vm.supports_ioeventfd:
        return
    registered: list[tuple[int, int]] = []
    for index, fd in enumerate(transport.queue_events):
        try:
            vm.register_ioeventfd(fd, notify_address, pio=False, length=4, datamatch=index)
        except (NotImplementedError, VmmError, OSError) as exc:
            log.debug("virtio.ioeventfd_unavailable", device=transport.id, queue=index, error=str(exc))
            continue
        registered.append((fd, index))

    def unregister() -> None:
        for fd, index in registered:
            try:
                vm.unregister_ioeventfd(fd, notify_address, pio=False, length=4, datamatch=index)
            except (NotImplementedError, VmmError, OSError):
                pass
        registered.clear()

    transport.add_cleanup(unregister)


def _attach_virtio_pci(machine: Machine, device: VirtioDevice, request: DeviceRequest) -> PlacedDevice:
    try:
        module = importlib.import_module("vmmkit.pci.virtio")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vmmkit.pci", "vmmkit.pci.virtio"):
            raise
        raise DeviceError(
            f"device {request.id}: the virtio-pci transport is not available (vmmkit.pci.virtio is "
            "missing); use --platform virtio_transport=mmio or transport=mmio"
        ) from None
    attach = getattr(module, "attach_virtio_pci", None)
    if attach is None:
        raise DeviceError(f"device {request.id}: vmmkit.pci.virtio has no attach_virtio_pci()")
    placed: PlacedDevice = attach(machine, device, request)
    return placed
