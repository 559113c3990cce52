"""Placing a :class:`VirtioDevice` behind virtio-mmio: what the ``virtio-mmio`` transport
(:class:`vmmkit.transport.VirtioMmio`) runs.

A 4 KiB window from the device manager's device-MMIO allocator (4 KiB aligned), or the
request's fixed ``mmio`` placement; a :class:`VirtioMmioTransport` on the MMIO bus; a legacy
interrupt from the device manager; and an ioeventfd per queue on the QueueNotify register
(``datamatch`` = queue index) where the backend has ioeventfds. The transport describes itself
to the guest (an ACPI ``LNRO0005`` device, a ``virtio,mmio`` device-tree node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.errors import BusError, DeviceError, VmmError
from vmmkit.log import get_logger
from vmmkit.virtio.device import VirtioDevice
from vmmkit.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, VirtioMmioTransport

if TYPE_CHECKING:
    from vmmkit.hypervisor import Vm
    from vmmkit.transport import DeviceHost

log = get_logger()

_MIN_WINDOW = 0x200
_PLACEMENT_TRIES = 64


def place_virtio_mmio(host: DeviceHost, device: VirtioDevice, request: DeviceRequest, *,
                      transport: str = "virtio-mmio") -> PlacedDevice:
    if request.pci_slot is not None or request.pci_segment:
        raise DeviceError(f"device {request.id}: pci_segment / pci_device_id place a PCI device, but this one "
                          "goes on virtio-mmio (use transport=pci, or leave them out)")
    irq, line = host.allocate_irq(request.irq)
    try:
        mmio = VirtioMmioTransport(device, memory=host.memory, line=line, event_loop=host.event_loop)
    except BaseException:
        host.release_irq(irq)
        raise
    mmio.core.on_event = host.device_events(request.id)
    try:
        base, size, allocated = _place_window(host, mmio, request)
    except BaseException:
        mmio.close()
        host.release_irq(irq)
        raise
    _register_ioeventfds(host.vm, mmio, base + QUEUE_NOTIFY)
    log.debug("virtio.mmio_attached", id=request.id, device_type=device.device_type, base=hex(base), irq=irq)
    return PlacedDevice(
        mmio, request, VirtioMmioTransport.kind, mmio=(base, size), irq=irq,
        properties={"virtio_device_type": device.device_type, "allocated": allocated},
        transport=transport,
    )


def remove_virtio_mmio(host: DeviceHost, placed: PlacedDevice) -> None:
    """Off the bus, its window and interrupt line back to the device manager (the manager
    closes the transport, which unregisters the ioeventfds)."""
    assert placed.mmio is not None
    host.mmio_bus.remove(placed.mmio[0])
    if placed.properties.get("allocated"):
        host.mmio_allocator.free(placed.mmio[0])
    if placed.irq is not None:
        host.release_irq(placed.irq)


def _place_window(host: DeviceHost, mmio: VirtioMmioTransport, request: DeviceRequest) -> tuple[int, int, bool]:
    """``(base, size, whether the window came from the allocator)``."""
    allocator = host.mmio_allocator
    if request.mmio is not None:
        base, size = request.mmio
        if size < _MIN_WINDOW:
            raise DeviceError(f"device {request.id}: a virtio-mmio window needs at least {_MIN_WINDOW:#x} bytes")
        try:
            allocator.allocate(size, at=base)
            allocated = True
        except BusError:
            allocated = False  # outside the window (a fixed platform address) or taken: the bus decides
        try:
            host.mmio_bus.insert(mmio, base, size)
        except BaseException:
            if allocated:
                allocator.free(base)
            raise
        return base, size, allocated
    # Ranges placed on the bus without the allocator (fixed platform devices) make a candidate
    # fail to insert; it stays reserved and the next one is tried.
    for _ in range(_PLACEMENT_TRIES):
        base = allocator.allocate(MMIO_SIZE, alignment=MMIO_SIZE)
        try:
            host.mmio_bus.insert(mmio, base, MMIO_SIZE)
        except BusError:
            continue
        return base, MMIO_SIZE, True
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
