"""The modern virtio-pci transport (virtio 1.2, section 4.1), modelled on Cloud Hypervisor's
``virtio-devices/src/transport/pci_device.rs`` and QEMU's ``hw/virtio/virtio-pci.c``.

The function is non-transitional: vendor 0x1AF4, device ID ``0x1040 + device type``,
revision 1, subsystem 0x1AF4 / ``0x1040 + device type``, and a class code chosen by device
type. Everything lives in one 64-bit, non-prefetchable memory BAR (BAR0, 512 KiB; the
offsets are Cloud Hypervisor's)::

    0x00000  common configuration      0x38 bytes   VIRTIO_PCI_CAP_COMMON_CFG
    0x02000  ISR status                1 byte       VIRTIO_PCI_CAP_ISR_CFG
    0x04000  device configuration      0x1000       VIRTIO_PCI_CAP_DEVICE_CFG
    0x06000  notifications             0x1000       VIRTIO_PCI_CAP_NOTIFY_CFG, notify_off_multiplier 4:
                                                    queue i is notified at 0x6000 + 4 * i
    0x08000  MSI-X table               16 bytes per vector (queues + 1, at most 2048)
    0x48000  MSI-X PBA                 up to 0x800

The capability list holds those four virtio structures, a VIRTIO_PCI_CAP_PCI_CFG window
(BAR access through configuration space) and the MSI-X capability.

Notifications: each queue has an eventfd (``ActivationContext.queue_events``). Where the
backend has ioeventfds, that eventfd is registered on the queue's notify address while BAR0
decodes there (moved when the guest moves the BAR), so a notification costs no exit; a write
that does reach the transport signals the same eventfd itself.

Interrupts: with MSI-X enabled, a queue interrupt goes to the queue's vector and a
configuration change to ``msix_config`` (nothing when that is VIRTIO_MSI_NO_VECTOR); with
MSI-X disabled, the ISR bit is set (1 queue, 2 configuration) and the function's INTA is held
high until the driver reads the ISR, which clears it.

Device status, feature negotiation, activation, reset and DEVICE_NEEDS_RESET are
:class:`vmmkit.virtio.core.TransportCore`'s; at DRIVER_OK this transport builds the virtqueues
(:class:`vmmkit.virtio.queue.Virtqueue`) from what the driver wrote to the queue registers.
Queue registers are the driver's until it enables that queue or sets DRIVER_OK; MSI-X vector
numbers beyond the table read back as VIRTIO_MSI_NO_VECTOR.

Every offset and size comes from the guest: an access outside a structure, of the wrong width
or misaligned reads as zero and is ignored when written; device exceptions are logged, never
raised into the vCPU. ``tests/unit/pci/test_virtio_pci_vs_qemu.py`` replays one driver
sequence on QEMU's virtio-rng-pci and on this transport and compares what it sees.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from vmmkit.device import DeviceRequest, PlacedDevice
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop
from vmmkit.hypervisor import Vm
from vmmkit.log import get_logger
from vmmkit.memory import GuestMemory
from vmmkit.pci.config import (
    CAP_ID_VNDR,
    COMMAND_INTX_DISABLE,
    BarKind,
    PciBar,
    PciConfigSpace,
    overlaps,
)
from vmmkit.pci.function import PciFunction
from vmmkit.pci.host import place_function
from vmmkit.pci.msix import MAX_VECTORS, MsixTable, pba_bytes, table_bytes
from vmmkit.state import StateError, field, int_field, pack_bytes, unpack_bytes
from vmmkit.virtio.core import TransportCore
from vmmkit.virtio.device import VIRTIO_F_RING_PACKED, VirtioDevice, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue

if TYPE_CHECKING:
    from vmmkit.transport import DeviceHost

log = get_logger()

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
VIRTIO_MSI_NO_VECTOR = 0xFFFF

#: virtio_pci_cap.cfg_type values.
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

#: ISR bits.
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

#: BAR0 layout.
BAR_INDEX = 0
BAR_SIZE = 0x8_0000
COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_SIZE = 0x38
ISR_CFG_OFFSET = 0x2000
ISR_CFG_SIZE = 1
DEVICE_CFG_OFFSET = 0x4000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_OFFSET = 0x6000
NOTIFY_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x8000
MSIX_PBA_OFFSET = 0x4_8000
MAX_QUEUES = NOTIFY_SIZE // NOTIFY_OFF_MULTIPLIER

#: Common configuration offsets (struct virtio_pci_common_cfg).
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
MSIX_CONFIG = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

#: Transport features this transport does not implement, hidden from the driver even if
#: the device offers them: packed rings, SR-IOV, notification data, notification config
#: data, per-queue reset, admin virtqueues.
_UNSUPPORTED_FEATURES = (
    VIRTIO_F_RING_PACKED | (1 << 37) | (1 << 38) | (1 << 39) | (1 << 40) | (1 << 41)
)

#: PCI (class, subclass) by virtio device type; anything else is "unclassified device".
_CLASS_BY_TYPE: dict[int, tuple[int, int]] = {
    1: (0x02, 0x00),  # net: Ethernet controller
    2: (0x01, 0x80),  # block: other mass storage
    3: (0x07, 0x80),  # console: other communication controller
    8: (0x01, 0x00),  # scsi: SCSI controller
    9: (0x02, 0x80),  # 9p: other network controller
    16: (0x03, 0x80),  # gpu: other display controller
    18: (0x09, 0x80),  # input: other input controller
    19: (0x07, 0x80),  # vsock: other communication controller
    23: (0x08, 0x06),  # iommu: IOMMU
    26: (0x01, 0x80),  # fs: other mass storage
    27: (0x01, 0x80),  # pmem: other mass storage
}


@attrs.define
class QueueRegisters:
    """What the driver wrote for one queue through the common configuration."""

    max_size: int
    size: int
    ready: bool = False
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    desc: int = 0
    driver: int = 0
    device: int = 0

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.desc = self.driver = self.device = 0


class VirtioPciInterrupt:
    """The :class:`vmmkit.virtio.VirtioInterrupt` a device gets at activation."""

    def __init__(self, transport: VirtioPciDevice) -> None:
        self._transport = transport

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        self._transport.signal(kind, queue_index)

    def queue_irqfd(self, queue_index: int) -> int | None:
        """An eventfd whose write raises queue ``queue_index``'s interrupt inside the hypervisor
        (a device's C data path signals through it without the GIL), or ``None`` (then use
        :meth:`trigger`): MSI-X must be on, the queue must have a vector, and the backend must
        route MSIs through irqfds. While the vector is masked the write stays pending in the
        eventfd, and KVM delivers it when the unmask registers the irqfd again."""
        transport = self._transport
        if not transport.msix.enabled or not 0 <= queue_index < len(transport.queues):
            return None
        vector = transport.queues[queue_index].msix_vector
        if vector == VIRTIO_MSI_NO_VECTOR or not 0 <= vector < transport.msix.num_vectors:
            return None
        return transport.msix.vectors[vector].irqfd


def _vendor_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"", bar: int = BAR_INDEX) -> bytes:
    """The body of a ``struct virtio_pci_cap`` after (cap_vndr, cap_next)."""
    cap_len = 16 + len(extra)
    return (bytes([cap_len, cfg_type, bar, 0, 0, 0]) + offset.to_bytes(4, "little")
            + length.to_bytes(4, "little") + extra)


class VirtioPciDevice(PciFunction):
    """A :class:`VirtioDevice` behind the modern virtio-pci transport.

    The dependencies are constructor arguments: ``vm`` for ioeventfds and MSI delivery,
    ``memory`` and ``event_loop`` for the activation context, ``allocate_msi_gsi`` /
    ``release_msi_gsi`` for MSI routes (optional; the GSIs go back when the device closes).
    The legacy interrupt arrives later through :meth:`connect_intx`, once the root knows the slot.
    """

    kind: ClassVar[str] = "virtio-pci"

    def __init__(
        self,
        device: VirtioDevice,
        *,
        vm: Vm,
        memory: GuestMemory,
        event_loop: EventLoop,
        allocate_msi_gsi: Callable[[], int | None] | None = None,
        release_msi_gsi: Callable[[int], None] | None = None,
        name: str | None = None,
    ) -> None:
        max_sizes = [int(size) for size in device.queue_max_sizes]
        if len(max_sizes) > MAX_QUEUES:
            raise DeviceError(f"{device.id}: {len(max_sizes)} queues, virtio-pci here allows {MAX_QUEUES}")
        device_type = int(device.device_type)
        if not 0 < device_type < 0x10000 - VIRTIO_PCI_DEVICE_ID_BASE:
            raise DeviceError(f"{device.id}: virtio device type {device_type} has no PCI device ID")
        class_code, subclass = _CLASS_BY_TYPE.get(device_type, (0xFF, 0x00))
        config = PciConfigSpace(
            vendor_id=VIRTIO_PCI_VENDOR_ID, device_id=VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            class_code=class_code, subclass=subclass, revision=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID, subsystem_id=VIRTIO_PCI_DEVICE_ID_BASE + device_type,
        )
        super().__init__(name or device.id, config)
        self.device = device
        self.vm = vm
        self.memory = memory
        self.event_loop = event_loop
        self.core = TransportCore(
            device, name=self.name, memory=memory, event_loop=event_loop, interrupt=VirtioPciInterrupt(self),
            unsupported_features=_UNSUPPORTED_FEATURES, virtqueues=self._build_virtqueues,
            reset_registers=self._reset_registers, log_prefix="virtio_pci",
        )
        #: Register state, taken on vCPU threads. Never taken by the interrupt path, which a
        #: queue's error callback may enter with the queue's lock held.
        self._lock = threading.RLock()
        #: The ISR and INTx level: vCPU and event-loop threads.
        self._isr_lock = threading.Lock()
        self.queues = [QueueRegisters(size, size) for size in max_sizes]
        #: The queues handed to the device at DRIVER_OK, until reset.
        self.virtqueues: list[Virtqueue] = []
        self.msix = MsixTable(vm, min(len(max_sizes) + 1, MAX_VECTORS), allocate_msi_gsi, release_msi_gsi)
        self._ioeventfds: list[tuple[int, int]] = []
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.isr = 0
        try:
            self._build_config()
        except BaseException:
            self.core.close_events()
            raise

    def _reset_registers(self) -> None:
        for queue in self.virtqueues:
            queue.reset()
        self.virtqueues = []
        for regs in self.queues:
            regs.reset()
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        with self._isr_lock:
            self.isr = 0
            self._update_intx()

    def _build_config(self) -> None:
        config = self.config
        config.add_bar(PciBar(BAR_INDEX, BAR_SIZE, BarKind.MEM64))
        config.add_capability(CAP_ID_VNDR, _vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET,
                                                       COMMON_CFG_SIZE))
        config.add_capability(CAP_ID_VNDR, _vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE))
        config.add_capability(CAP_ID_VNDR, _vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET,
                                                       DEVICE_CFG_SIZE))
        config.add_capability(CAP_ID_VNDR, _vendor_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_SIZE,
            NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little")))
        # virtio_pci_cfg_cap: bar, offset, length and the 4-byte data window are driver-writable.
        pci_cfg = _vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4), bar=0)
        writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self._pci_cfg_cap = config.add_capability(CAP_ID_VNDR, pci_cfg, writable)
        self.msix.add_capability(config, table_bar=BAR_INDEX, table_offset=MSIX_TABLE_OFFSET,
                                 pba_bar=BAR_INDEX, pba_offset=MSIX_PBA_OFFSET)

    # -- wiring --------------------------------------------------------------------------

    def set_requester_id(self, requester_id: int) -> None:
        super().set_requester_id(requester_id)
        self.msix.set_requester_id(requester_id)

    def placement_properties(self) -> Mapping[str, Any]:
        return {"device_type": int(self.device.device_type), "msix_vectors": self.msix.num_vectors}

    @property
    def queue_events(self) -> Sequence[int]:
        return tuple(self.core.queue_events)

    @property
    def ioeventfds(self) -> Sequence[tuple[int, int]]:
        """``(eventfd, guest address)`` of the notify ioeventfds registered now."""
        return tuple(self._ioeventfds)

    # -- configuration space (the PCI_CFG window, MSI-X control, INTx disable) ------------

    def config_read(self, offset: int, size: int) -> int:
        if self.config.valid_access(offset, size) and overlaps(offset, size, self._pci_cfg_cap + 16, 4):
            window = self._pci_cfg_target()
            if window is not None:
                bar_offset, length = window
                data = self.bar_read(BAR_INDEX, bar_offset, length)
                self.config.set(self._pci_cfg_cap + 16, 4, int.from_bytes(data, "little"), default=False)
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self.config.valid_access(offset, size):
            return
        self.config.write(offset, size, value)
        self.msix.config_written(self.config, offset, size)
        if overlaps(offset, size, self._pci_cfg_cap + 16, 4):
            window = self._pci_cfg_target()
            if window is not None:
                bar_offset, length = window
                data = self.config.get(self._pci_cfg_cap + 16, 4).to_bytes(4, "little")[:length]
                self.bar_write(BAR_INDEX, bar_offset, data)
        with self._isr_lock:
            self._update_intx()

    def _pci_cfg_target(self) -> tuple[int, int] | None:
        """(offset, length) in BAR0 the PCI_CFG window selects, if it is a valid access."""
        cap = self._pci_cfg_cap
        bar = self.config.get(cap + 4, 1)
        bar_offset = self.config.get(cap + 8, 4)
        length = self.config.get(cap + 12, 4)
        if bar != BAR_INDEX or length not in (1, 2, 4) or bar_offset % length \
                or bar_offset + length > BAR_SIZE:
            return None
        return bar_offset, length

    # -- BAR0 ----------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if index != BAR_INDEX or size > 8 or offset < 0:
            return bytes(size)
        if _inside(offset, size, COMMON_CFG_OFFSET, COMMON_CFG_SIZE):
            with self._lock:
                value = self._common_read(offset - COMMON_CFG_OFFSET, size)
            return value.to_bytes(size, "little")
        if _inside(offset, size, ISR_CFG_OFFSET, 0x1000):
            if offset != ISR_CFG_OFFSET:
                return bytes(size)
            with self._isr_lock:
                value, self.isr = self.isr, 0
                self._update_intx()
            return value.to_bytes(size, "little")
        if _inside(offset, size, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE):
            return self._device_config_read(offset - DEVICE_CFG_OFFSET, size)
        if _inside(offset, size, MSIX_TABLE_OFFSET, table_bytes(self.msix.num_vectors)):
            return self.msix.read_table(offset - MSIX_TABLE_OFFSET, size)
        if _inside(offset, size, MSIX_PBA_OFFSET, pba_bytes(self.msix.num_vectors)):
            return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        return bytes(size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        size = len(data)
        if index != BAR_INDEX or not 0 < size <= 8 or offset < 0:
            return
        if _inside(offset, size, NOTIFY_OFFSET, NOTIFY_SIZE):
            self._notify(offset - NOTIFY_OFFSET)
        elif _inside(offset, size, COMMON_CFG_OFFSET, COMMON_CFG_SIZE):
            with self._lock:
                self._common_write(offset - COMMON_CFG_OFFSET, size, int.from_bytes(data, "little"))
        elif _inside(offset, size, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE):
            self._device_config_write(offset - DEVICE_CFG_OFFSET, data)
        elif _inside(offset, size, MSIX_TABLE_OFFSET, table_bytes(self.msix.num_vectors)):
            self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)
        # The ISR is read-only and the PBA ignores writes.

    def _notify(self, offset: int) -> None:
        queue, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if not rest:
            self.core.notify(queue)

    def _device_config_read(self, offset: int, size: int) -> bytes:
        try:
            data = bytes(self.device.read_config(offset, size))
        except Exception:
            log.exception("virtio_pci.read_config_failed", device=self.name, offset=offset)
            return bytes(size)
        return (data + bytes(size))[:size]

    def _device_config_write(self, offset: int, data: bytes) -> None:
        try:
            self.device.write_config(offset, data)
        except Exception:
            log.exception("virtio_pci.write_config_failed", device=self.name, offset=offset)

    # -- common configuration ------------------------------------------------------------

    def _selected(self) -> QueueRegisters | None:
        select = self.queue_select
        return self.queues[select] if select < len(self.queues) else None

    def _common_read(self, offset: int, size: int) -> int:
        queue = self._selected()
        field = _address_field(offset, size)
        if field is not None:
            if queue is None:
                return 0
            value: int = getattr(queue, field)
            return value if size == 8 else (value >> (8 * (offset & 4))) & 0xFFFF_FFFF
        if size == 4:
            if offset == DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            if offset == DEVICE_FEATURE:
                return self.core.device_feature_bits(self.device_feature_select)
            if offset == DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            if offset == DRIVER_FEATURE:
                return self.core.driver_feature_bits(self.driver_feature_select)
            return 0
        if size == 2:
            if offset == MSIX_CONFIG:
                return self.msix_config
            if offset == NUM_QUEUES:
                return len(self.queues)
            if offset == QUEUE_SELECT:
                return self.queue_select
            if queue is None:
                return VIRTIO_MSI_NO_VECTOR if offset == QUEUE_MSIX_VECTOR else 0
            if offset == QUEUE_SIZE:
                return queue.size
            if offset == QUEUE_MSIX_VECTOR:
                return queue.msix_vector
            if offset == QUEUE_ENABLE:
                return int(queue.ready)
            if offset == QUEUE_NOTIFY_OFF:
                return self.queue_select
            return 0
        if size == 1:
            if offset == DEVICE_STATUS:
                return self.core.device_status
            if offset == CONFIG_GENERATION:
                return self.core.read_generation() & 0xFF
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        queue = self._selected()
        if size == 1:
            if offset == DEVICE_STATUS:
                self.core.write_status(value)
            return
        if size == 2:
            if offset == MSIX_CONFIG:
                self.msix_config = self._vector(value)
            elif offset == QUEUE_SELECT:
                self.queue_select = value
            elif queue is None:
                return
            elif offset == QUEUE_SIZE:
                # Kept as written: an invalid size is refused when the queue is validated at
                # DRIVER_OK (DEVICE_NEEDS_RESET), as virtio-mmio does, rather than silently
                # replaced by one the driver did not lay its rings out for.
                if self._queue_configurable(queue):
                    queue.size = value & 0xFFFF
            elif offset == QUEUE_MSIX_VECTOR:
                queue.msix_vector = self._vector(value)
            elif offset == QUEUE_ENABLE:
                if value == 1 and self._queue_configurable(queue):
                    queue.ready = True
            return
        if size == 4:
            if offset == DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
                return
            if offset == DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
                return
            if offset == DRIVER_FEATURE:
                self.core.write_driver_feature_bits(self.driver_feature_select, value)
                return
        field = _address_field(offset, size)
        if field is not None and queue is not None and self._queue_configurable(queue):
            if size == 8:
                setattr(queue, field, value)
            else:
                shift = 8 * (offset & 4)
                old = getattr(queue, field)
                setattr(queue, field, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _queue_configurable(self, queue: QueueRegisters) -> bool:
        """Queue fields are the driver's to set until it enables the queue or the device."""
        return not queue.ready and not self.core.queue_setup_locked()

    def _vector(self, value: int) -> int:
        return value if value < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    def _build_virtqueues(self) -> list[Virtqueue]:
        """DRIVER_OK: the virtqueues as the driver set them up in the queue registers."""
        self.virtqueues = []
        for index, regs in enumerate(self.queues):
            queue = Virtqueue(regs.max_size, self.memory, index)
            queue.size = regs.size
            queue.desc_table = regs.desc
            queue.avail_ring = regs.driver
            queue.used_ring = regs.device
            queue.ready = regs.ready
            self.virtqueues.append(queue)
        return self.virtqueues

    # -- interrupts ------------------------------------------------------------------------

    def signal(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        """Raise a queue or configuration interrupt (any thread)."""
        config = kind is VirtioInterruptType.CONFIG
        if self.core.closed:
            return
        with self._isr_lock:
            self.core.counts["interrupts"] += 1
            if config:
                self.core.bump_generation()
            if self.msix.enabled:
                if config:
                    vector = self.msix_config
                elif 0 <= queue_index < len(self.queues):
                    vector = self.queues[queue_index].msix_vector
                else:
                    return
                if vector != VIRTIO_MSI_NO_VECTOR:
                    self.msix.trigger(vector)
                return
            self.isr |= ISR_CONFIG if config else ISR_QUEUE
            self._update_intx()

    def _update_intx(self) -> None:
        """INTA follows the ISR, unless MSI-X is on or the command register disables INTx.
        Call with the ISR lock held."""
        pending = self.isr != 0
        self.config.set_interrupt_status(pending)
        if self.intx is not None:
            level = pending and not self.msix.enabled and not self.config.command & COMMAND_INTX_DISABLE
            self.intx.set_level(level)

    # -- ioeventfds --------------------------------------------------------------------------

    def bar_mapped(self, index: int, base: int) -> None:
        if index != BAR_INDEX or not self.vm.supports_ioeventfd:
            return
        for queue, fd in enumerate(self.core.queue_events):
            address = base + NOTIFY_OFFSET + queue * NOTIFY_OFF_MULTIPLIER
            try:
                self.vm.register_ioeventfd(fd, address, pio=False)
            except Exception as exc:
                # The notify write then exits and :meth:`_notify` signals the eventfd.
                log.warning("virtio_pci.ioeventfd_failed", device=self.name, queue=queue,
                            address=hex(address), error=str(exc))
                continue
            self._ioeventfds.append((fd, address))

    def bar_unmapped(self, index: int, base: int) -> None:
        if index != BAR_INDEX:
            return
        registered, self._ioeventfds = self._ioeventfds, []
        for fd, address in registered:
            try:
                self.vm.unregister_ioeventfd(fd, address, pio=False)
            except Exception as exc:
                log.warning("virtio_pci.ioeventfd_release_failed", device=self.name, error=str(exc))

    # -- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """VM reset: the virtio state, MSI-X, then the configuration space and BAR mapping."""
        with self._lock:
            self.core.reset()
            self.msix.reset()
        super().reset()

    def pause(self) -> None:
        self.device.pause()

    def resume(self) -> None:
        self.device.resume()

    def hand_over(self) -> None:
        self.device.hand_over()

    def take_back(self) -> None:
        self.device.take_back()

    def close(self) -> None:
        self.core.close(self._release)

    def _release(self) -> None:
        self.bar_unmapped(BAR_INDEX, 0)
        self.msix.close()

    def resize(self, size: int) -> None:
        self.device.resize(size)

    def counters(self) -> Mapping[str, int]:
        return self.core.counters()

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1
    _QUEUE_FIELDS: ClassVar[tuple[str, ...]] = ("size", "ready", "msix_vector", "desc", "driver", "device")

    def save_state(self) -> dict[str, Any]:
        """The configuration space (BARs, command, MSI-X control), the MSI-X table, the
        common-configuration registers and the virtio state (:meth:`TransportCore.save_state`)."""
        with self._lock:
            with self._isr_lock:
                isr = self.isr
            return {
                "config": pack_bytes(self.config.save_registers()),
                "msix": self.msix.save_state(),
                "registers": {"device_feature_select": self.device_feature_select,
                              "driver_feature_select": self.driver_feature_select,
                              "queue_select": self.queue_select, "msix_config": self.msix_config, "isr": isr},
                "queues": [{name: getattr(regs, name) for name in self._QUEUE_FIELDS} for regs in self.queues],
                "virtio": self.core.save_state(self.virtqueues),
            }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        what = self.name
        config = unpack_bytes(field(state, "config", str, what), f"{what}.config", len(self.config.save_registers()))
        registers = field(state, "registers", dict, what)
        queues = field(state, "queues", list, what)
        if len(queues) != len(self.queues):
            raise StateError(f"{what}: {len(queues)} queues saved, the device has {len(self.queues)}")
        values = {name: int_field(registers, name, f"{what}.registers", 0, 0xFFFF_FFFF)
                  for name in ("device_feature_select", "driver_feature_select", "queue_select", "msix_config", "isr")}
        parsed = []
        for index, (saved, regs) in enumerate(zip(queues, self.queues, strict=True)):
            if not isinstance(saved, dict):
                raise StateError(f"{what}.queues[{index}]: expected an object")
            entry = {name: (field(saved, name, bool, f"{what}.queues[{index}]") if name == "ready"
                            else int_field(saved, name, f"{what}.queues[{index}]")) for name in self._QUEUE_FIELDS}
            if not 0 < entry["size"] <= regs.max_size or entry["size"] & (entry["size"] - 1):
                raise StateError(f"{what}.queues[{index}].size: {entry['size']} is not a valid queue size")
            parsed.append(entry)
        with self._lock:
            self.config.restore_registers(config)
            self.msix.restore_state(field(state, "msix", dict, what), f"{what}.msix")
            for regs, entry in zip(self.queues, parsed, strict=True):
                for name, value in entry.items():
                    setattr(regs, name, value)
            self.device_feature_select = values["device_feature_select"]
            self.driver_feature_select = values["driver_feature_select"]
            self.queue_select = values["queue_select"]
            self.msix_config = values["msix_config"]
            self.core.restore_state(field(state, "virtio", dict, what))
            with self._isr_lock:
                self.isr = values["isr"]
                self._update_intx()
        self.remap()  # the BARs where the guest put them (and the notify ioeventfds with them)

    def describe(self) -> Mapping[str, Any]:
        return {
            "transport": "pci", "device_type": self.device.device_type, "status": self.core.device_status,
            "offered_features": self.core.offered_features, "driver_features": self.core.driver_features,
            "isr": self.isr, "config_generation": self.core.generation & 0xFF,
            "msix": {"enabled": self.msix.enabled, "function_masked": self.msix.function_masked,
                     "vectors": self.msix.num_vectors},
            "ioeventfds": len(self._ioeventfds),
            "queues": [queue.describe() for queue in self.virtqueues]
            or [attrs.asdict(regs) for regs in self.queues],
            **self.device.describe(),
        }


_ADDRESS_FIELDS = {QUEUE_DESC: "desc", QUEUE_DRIVER: "driver", QUEUE_DEVICE: "device"}


def _address_field(offset: int, size: int) -> str | None:
    """The queue address a naturally aligned 4- or 8-byte access at ``offset`` touches."""
    if size not in (4, 8) or offset % size:
        return None
    return _ADDRESS_FIELDS.get(offset & ~7)


def _inside(offset: int, size: int, start: int, length: int) -> bool:
    return start <= offset and offset + size <= start + length


def place_virtio_pci(host: DeviceHost, device: VirtioDevice, request: DeviceRequest, *,
                     transport: str = "virtio-pci") -> PlacedDevice:
    """Wrap ``device`` in a :class:`VirtioPciDevice` and plug it in as a PCI function
    (:func:`vmmkit.pci.host.place_function`: segment, slot, BARs, INTA)."""
    function = VirtioPciDevice(device, vm=host.vm, memory=host.memory, event_loop=host.event_loop,
                               allocate_msi_gsi=host.allocate_msi_gsi, release_msi_gsi=host.release_msi_gsi,
                               name=request.id)
    function.core.on_event = host.device_events(request.id)
    try:
        return place_function(host, function, request, transport=transport)
    except BaseException:
        function.close()
        raise
