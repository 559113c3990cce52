"""virtio over MMIO, version 2 (virtio 1.2, section 4.2): the register block Linux's
``virtio_mmio`` driver finds through ``virtio_mmio.device=4K@<base>:<irq>`` or an ACPI
``LNRO0005`` node.

Layout of the 4 KiB window (all registers 32 bits wide, little endian)::

    0x000 MagicValue "virt"   0x004 Version (2)       0x008 DeviceID      0x00c VendorID
    0x010 DeviceFeatures      0x014 DeviceFeaturesSel 0x020 DriverFeatures 0x024 DriverFeaturesSel
    0x030 QueueSel            0x034 QueueNumMax       0x038 QueueNum      0x044 QueueReady
    0x050 QueueNotify         0x060 InterruptStatus   0x064 InterruptACK  0x070 Status
    0x080/0x084 QueueDesc     0x090/0x094 QueueDriver 0x0a0/0x0a4 QueueDevice (low/high)
    0x0ac SHMSel  0x0b0-0x0bc SHMLen/SHMBase (no regions: read all ones)  0x0c0 QueueReset
    0x0fc ConfigGeneration    0x100-0xfff device-specific configuration space

Every offset and size is the guest's: a register access that is not 32 bits wide and aligned
reads as zero and is ignored when written; reads of write-only or unknown registers return zero;
configuration-space accesses must be 1, 2, 4 or 8 bytes, naturally aligned, and inside the
window. Nothing the guest writes makes :meth:`VirtioMmioTransport.read` or ``write`` raise.

Status, feature negotiation, activation, reset and ``DEVICE_NEEDS_RESET`` are
:class:`vmmkit.virtio.core.TransportCore`'s; DriverFeatures is taken only once ``DRIVER`` is set.
Queue registers are writable only between ``FEATURES_OK`` and ``DRIVER_OK`` and, except
``QueueReady``, while the selected queue is not ready; writing 0 to ``QueueReady`` (to stop using
a queue) works at any time, and the queue then stays unused until the device is reset.

Notifications. Each queue has an eventfd (``ActivationContext.queue_events[i]``). Where the
backend has ioeventfds, :func:`vmmkit.virtio.transport.place_virtio_mmio` registers each one on
``base + 0x050`` with ``datamatch = i``: a driver's kick then signals the eventfd inside the
hypervisor without leaving the guest. Otherwise (and for a value no ioeventfd matched) the
write reaches :meth:`write` here, which signals the queue's eventfd itself: the device sees the
same eventfd either way. Kicks before ``DRIVER_OK`` stay pending in the eventfd.

Interrupts. One legacy line (the device manager's ``allocate_irq()``). To signal, the transport sets bit 0
(used buffer) or bit 1 (configuration change) of InterruptStatus and then pulses the line with
``InterruptLine.trigger()``: an irqfd write where the backend has irqfds, else a
``set_irq_line`` high-then-low. That is edge semantics, as Firecracker's ``IrqTrigger`` (the
irqfd of every virtio-mmio device, ``irq_status |= bit; irq_evt.write(1)``) and Cloud
Hypervisor use: every event is a new edge, even if the bit was already set, so none is lost
while the driver's handler runs (Linux's ``vm_interrupt`` reads the status, acknowledges what
it read, then scans every queue). Nothing holds the line high until InterruptACK as a level
interrupt would; to approximate that where the guest programmed the pin level-triggered (or a
pulse met a masked pin) the transport pulses again whenever an InterruptACK leaves bits set.
The cost of pulsing per event is an occasional interrupt that finds InterruptStatus already
clear, which Linux tolerates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.device import Device
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger

# The status bits are this register block's too (re-exported).
from vmmkit.virtio.core import ACKNOWLEDGE as ACKNOWLEDGE
from vmmkit.virtio.core import DEVICE_NEEDS_RESET as DEVICE_NEEDS_RESET
from vmmkit.virtio.core import DRIVER, FEATURES_OK, TransportCore
from vmmkit.virtio.core import DRIVER_OK as DRIVER_OK
from vmmkit.virtio.core import FAILED as FAILED
from vmmkit.virtio.device import VIRTIO_F_RING_PACKED, VirtioDevice, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue

if TYPE_CHECKING:
    from vmmkit.device import PlacedDevice
    from vmmkit.eventloop import EventLoop
    from vmmkit.firmware import AcpiScope, FdtWriter
    from vmmkit.irq import InterruptLine
    from vmmkit.memory import GuestMemory

log = get_logger()

MMIO_SIZE: Final = 0x1000
MAGIC_VALUE: Final = 0x74726976  # "virt"
VERSION: Final = 2
VENDOR_ID: Final = 0  # as Cloud Hypervisor and Firecracker

# Register offsets (virtio 1.2, 4.2.2).
MAGIC: Final = 0x000
VERSION_REG: Final = 0x004
DEVICE_ID: Final = 0x008
VENDOR_ID_REG: Final = 0x00C
DEVICE_FEATURES: Final = 0x010
DEVICE_FEATURES_SEL: Final = 0x014
DRIVER_FEATURES: Final = 0x020
DRIVER_FEATURES_SEL: Final = 0x024
QUEUE_SEL: Final = 0x030
QUEUE_NUM_MAX: Final = 0x034
QUEUE_NUM: Final = 0x038
QUEUE_READY: Final = 0x044
QUEUE_NOTIFY: Final = 0x050
INTERRUPT_STATUS: Final = 0x060
INTERRUPT_ACK: Final = 0x064
STATUS: Final = 0x070
QUEUE_DESC_LOW: Final = 0x080
QUEUE_DESC_HIGH: Final = 0x084
QUEUE_DRIVER_LOW: Final = 0x090
QUEUE_DRIVER_HIGH: Final = 0x094
QUEUE_DEVICE_LOW: Final = 0x0A0
QUEUE_DEVICE_HIGH: Final = 0x0A4
SHM_SEL: Final = 0x0AC
SHM_LEN_LOW: Final = 0x0B0
SHM_BASE_HIGH: Final = 0x0BC
QUEUE_RESET: Final = 0x0C0
CONFIG_GENERATION: Final = 0x0FC
CONFIG: Final = 0x100

# InterruptStatus bits.
INT_VRING: Final = 1
INT_CONFIG: Final = 2

#: Transport features this transport does not implement, never offered whatever the device says:
#: packed rings, notification data (34, 38, 39) and per-queue reset (40).
UNSUPPORTED_FEATURES: Final = VIRTIO_F_RING_PACKED | (1 << 38) | (1 << 39) | (1 << 40)

_QUEUE_ADDRESS_REGISTERS: Final = {
    QUEUE_DESC_LOW: ("desc_table", 0), QUEUE_DESC_HIGH: ("desc_table", 32),
    QUEUE_DRIVER_LOW: ("avail_ring", 0), QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    QUEUE_DEVICE_LOW: ("used_ring", 0), QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


class MmioInterrupt:
    """The :class:`VirtioInterrupt` a device behind this transport gets."""

    __slots__ = ("_transport",)

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self._transport = transport

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        self._transport.raise_interrupt(INT_CONFIG if kind is VirtioInterruptType.CONFIG else INT_VRING)


class VirtioMmioTransport(Device):
    """A :class:`VirtioDevice` behind a virtio-mmio (version 2) register window.

    :param device: the virtio device.
    :param memory: guest RAM, for the queues.
    :param line: the legacy interrupt line.
    :param event_loop: where the device processes its queue events.
    """

    kind = "virtio-mmio"

    def __init__(self, device: VirtioDevice, *, memory: GuestMemory, line: InterruptLine,
                 event_loop: EventLoop) -> None:
        super().__init__(device.id)
        self.device = device
        self.memory = memory
        self.line = line
        self.event_loop = event_loop
        if not 0 < device.device_type <= 0xFFFF_FFFF:
            raise DeviceError(f"{device.id}: virtio device type {device.device_type} is invalid")
        self.interrupt = MmioInterrupt(self)
        self.core = TransportCore(
            device, name=device.id, memory=memory, event_loop=event_loop, interrupt=self.interrupt,
            unsupported_features=UNSUPPORTED_FEATURES, virtqueues=lambda: self.queues,
            reset_registers=self._reset_registers, log_prefix="virtio",
        )
        #: The queues, which the queue registers write straight into.
        self.queues = [Virtqueue(size, memory, index) for index, size in enumerate(device.queue_max_sizes)]
        self._lock = threading.RLock()  # register state; vCPU threads
        self._isr_lock = threading.Lock()  # InterruptStatus; vCPU and event-loop threads
        self._cleanups: list[Callable[[], None]] = []
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0

    # -- state -----------------------------------------------------------------------------

    def _reset_registers(self) -> None:
        for queue in self.queues:
            queue.reset()
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        with self._isr_lock:
            self.interrupt_status = 0

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` on :meth:`close`, before the eventfds are closed (ioeventfds)."""
        self._cleanups.append(cleanup)

    @property
    def queue_events(self) -> Sequence[int]:
        return tuple(self.core.queue_events)

    @property
    def driver_features(self) -> int:
        return self.core.driver_features

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _queue_setup_allowed(self) -> bool:
        return self.core.status & FEATURES_OK != 0 and not self.core.queue_setup_locked()

    # -- the bus ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0 or size > 8:
            return b"\0" * max(size, 0)
        try:
            if offset >= CONFIG:
                return self._read_config(offset, size)
            if size != 4 or offset % 4 or offset < 0:
                return b"\0" * size
            with self._lock:
                return self._read_register(offset).to_bytes(4, "little")
        except Exception:  # a device bug must not take the vCPU down
            log.exception("virtio.mmio_read_failed", device=self.id, offset=offset, size=size)
            return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        try:
            if offset >= CONFIG:
                self._write_config(offset, bytes(data))
                return
            if size != 4 or offset % 4 or offset < 0:
                return
            with self._lock:
                self._write_register(offset, int.from_bytes(data, "little"))
        except Exception:
            log.exception("virtio.mmio_write_failed", device=self.id, offset=offset, size=size)

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.core.device_feature_bits(self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            queue = self._selected_queue()
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.core.device_status
        if SHM_LEN_LOW <= offset <= SHM_BASE_HIGH:
            return 0xFFFF_FFFF  # no shared memory region has the selected id
        if offset == CONFIG_GENERATION:
            return self.core.read_generation() & 0xFFFF_FFFF
        return 0  # write-only or reserved

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.core.status & DRIVER:
                self.core.write_driver_feature_bits(self.driver_features_sel, value)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            queue = self._selected_queue()
            if queue is not None and self._queue_setup_allowed() and not queue.ready:
                queue.size = value
        elif offset == QUEUE_READY:
            queue = self._selected_queue()
            if queue is not None and (self._queue_setup_allowed() or not value & 1):
                queue.ready = bool(value & 1)  # "to stop using the queue" works at any time
        elif offset in _QUEUE_ADDRESS_REGISTERS:
            queue = self._selected_queue()
            if queue is not None and self._queue_setup_allowed() and not queue.ready:
                name, shift = _QUEUE_ADDRESS_REGISTERS[offset]
                old = getattr(queue, name)
                setattr(queue, name, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))
        elif offset == QUEUE_NOTIFY:
            self.core.notify(value)
        elif offset == INTERRUPT_ACK:
            self.acknowledge_interrupt(value)
        elif offset == STATUS:
            self.core.write_status(value & 0xFF)
        # DeviceFeatures, SHMSel, QueueReset and the read-only registers: ignored

    def _read_config(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4, 8) or offset % size or offset + size > MMIO_SIZE:
            return b"\0" * size
        data = bytes(self.device.read_config(offset - CONFIG, size))
        return (data + b"\0" * size)[:size]

    def _write_config(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4, 8) or offset % size or offset + size > MMIO_SIZE:
            return
        self.device.write_config(offset - CONFIG, data)

    # -- notifications and interrupts ------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """A QueueNotify write that no ioeventfd took: signal the queue's eventfd."""
        self.core.notify(queue_index)

    def raise_interrupt(self, bits: int) -> None:
        """Set InterruptStatus ``bits`` and pulse the line."""
        with self._isr_lock:
            self.interrupt_status |= bits
            if bits & INT_CONFIG:
                self.core.bump_generation()
            self.core.counts["interrupts"] += 1
        self.line.trigger()

    def acknowledge_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status &= ~bits
            again = self.interrupt_status != 0
        if again:
            self.line.trigger()

    # -- lifecycle -------------------------------------------------------------------------

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1
    _QUEUE_FIELDS: ClassVar[tuple[str, ...]] = ("size", "ready", "desc_table", "avail_ring", "used_ring")

    def save_state(self) -> dict[str, Any]:
        """The registers, each queue's setup and the virtio state (:meth:`TransportCore.save_state`)."""
        with self._lock:
            with self._isr_lock:
                status = self.interrupt_status
            return {
                "registers": {"device_features_sel": self.device_features_sel,
                              "driver_features_sel": self.driver_features_sel, "queue_sel": self.queue_sel,
                              "interrupt_status": status},
                "queues": [{name: getattr(queue, name) for name in self._QUEUE_FIELDS} for queue in self.queues],
                "virtio": self.core.save_state(self.queues),
            }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        what = self.id
        registers = field(state, "registers", dict, what)
        values = {name: int_field(registers, name, f"{what}.registers", 0, 0xFFFF_FFFF)
                  for name in ("device_features_sel", "driver_features_sel", "queue_sel", "interrupt_status")}
        queues = field(state, "queues", list, what)
        if len(queues) != len(self.queues):
            raise StateError(f"{what}: {len(queues)} queues saved, the device has {len(self.queues)}")
        parsed = []
        for index, (saved, queue) in enumerate(zip(queues, self.queues, strict=True)):
            if not isinstance(saved, dict):
                raise StateError(f"{what}.queues[{index}]: expected an object")
            entry = {name: (field(saved, name, bool, f"{what}.queues[{index}]") if name == "ready"
                            else int_field(saved, name, f"{what}.queues[{index}]")) for name in self._QUEUE_FIELDS}
            if not 0 < entry["size"] <= queue.max_size or entry["size"] & (entry["size"] - 1):
                raise StateError(f"{what}.queues[{index}].size: {entry['size']} is not a valid queue size")
            parsed.append(entry)
        with self._lock:
            for queue, entry in zip(self.queues, parsed, strict=True):
                for name, value in entry.items():
                    setattr(queue, name, value)
            self.device_features_sel = values["device_features_sel"]
            self.driver_features_sel = values["driver_features_sel"]
            self.queue_sel = values["queue_sel"]
            self.core.restore_state(field(state, "virtio", dict, what))
            with self._isr_lock:
                self.interrupt_status = values["interrupt_status"]

    def reset(self) -> None:
        """Device reset (the VM reboots)."""
        with self._lock:
            self.core.reset()

    def pause(self) -> None:
        self.device.pause()

    def resume(self) -> None:
        self.device.resume()

    def hand_over(self) -> None:
        self.device.hand_over()

    def take_back(self) -> None:
        self.device.take_back()

    def close(self) -> None:
        self.core.close(self._run_cleanups)

    def _run_cleanups(self) -> None:
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("virtio.cleanup_failed", device=self.id)
        self._cleanups.clear()

    def resize(self, size: int) -> None:
        self.device.resize(size)

    def counters(self) -> Mapping[str, int]:
        return self.core.counters()

    def firmware_properties(self) -> Mapping[str, Any]:
        return {"virtio_device_type": self.device.device_type}

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``LNRO0005`` with the window and an edge-triggered interrupt, as Linux's
        virtio_mmio driver matches it (drivers/virtio/virtio_mmio.c, ``virtio_mmio_acpi_match``)."""
        from vmmkit.acpi import aml

        if placed.mmio is None:
            return
        index = scope.next_index("virtio-mmio")
        resources: list[aml.AmlObject] = [aml.Memory32Fixed(*placed.mmio)]
        if placed.irq is not None:
            resources.append(aml.Interrupt(placed.irq, edge=True, active_low=False))
        scope.add(aml.simple_device(f"V{index:03X}", "LNRO0005", index, resources))

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """``virtio,mmio`` (Documentation/devicetree/bindings/virtio/mmio.yaml)."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        fdt.begin_node(f"virtio_mmio@{base:x}")
        fdt.property_strings("compatible", "virtio,mmio")
        fdt.property_reg(base, size)
        if placed.irq is not None:
            fdt.property_interrupt(placed.irq, edge=True)
        fdt.property("dma-coherent", b"")
        fdt.end_node()

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "mmio", "device_type": self.device.device_type, "status": self.core.device_status,
            "offered_features": self.core.offered_features, "driver_features": self.core.driver_features,
            "interrupt_status": self.interrupt_status, "config_generation": self.core.generation & 0xFFFF_FFFF,
            "queues": [queue.describe() for queue in self.queues], **self.device.describe(),
        }
