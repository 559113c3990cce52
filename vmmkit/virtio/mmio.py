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

Status follows virtio 1.2 section 2.1 and 3.1: ``ACKNOWLEDGE`` -> ``DRIVER`` -> ``FEATURES_OK``
(accepted only if the driver's features are a subset of those offered and include
``VIRTIO_F_VERSION_1``; otherwise the bit stays clear, which is how the driver learns) ->
``DRIVER_OK`` (the queues are validated and the device is activated with an
:class:`ActivationContext`). Bits may be set together but only in that order; clearing bits other
than by writing 0 is ignored; ``FAILED`` may be set at any time; writing 0 resets the device.
``DEVICE_NEEDS_RESET`` reads as set once the device or a queue is broken (a protocol violation,
a failed activation); when it appears after ``DRIVER_OK`` a configuration-change interrupt is sent.
Queue registers are writable only between ``FEATURES_OK`` and ``DRIVER_OK`` and, except
``QueueReady``, while the selected queue is not ready; writing 0 to ``QueueReady`` (to stop using
a queue) works at any time, and the queue then stays unused until the device is reset.

Notifications. Each queue has an eventfd (``ActivationContext.queue_events[i]``). Where the
backend has ioeventfds, :func:`vmmkit.virtio.transport.attach_virtio` registers each one on
``base + 0x050`` with ``datamatch = i``: a driver's kick then signals the eventfd inside the
hypervisor without leaving the guest. Otherwise (and for a value no ioeventfd matched) the
write reaches :meth:`write` here, which signals the queue's eventfd itself: the device sees the
same eventfd either way. Kicks before ``DRIVER_OK`` stay pending in the eventfd.

Interrupts. One legacy line (``machine.allocate_irq()``). To signal, the transport sets bit 0
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

import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import Device
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.virtio.chain import MAX_QUEUE_SIZE, VirtqueueError
from vmmkit.virtio.device import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    ActivationContext,
    VirtioDevice,
    VirtioInterruptType,
)
from vmmkit.virtio.queue import Virtqueue

if TYPE_CHECKING:
    from vmmkit.eventloop import EventLoop
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

# Device status bits (virtio 1.2, 2.1).
ACKNOWLEDGE: Final = 1
DRIVER: Final = 2
DRIVER_OK: Final = 4
FEATURES_OK: Final = 8
DEVICE_NEEDS_RESET: Final = 0x40
FAILED: Final = 0x80

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

    #: Called with "activated" / "reset" (the machine turns it into an event); optional.
    on_event: Callable[[str], None] | None = None

    def __init__(self, device: VirtioDevice, *, memory: GuestMemory, line: InterruptLine,
                 event_loop: EventLoop) -> None:
        super().__init__(device.id)
        self.device = device
        device.on_broken = self.fail
        self.memory = memory
        self.line = line
        self.event_loop = event_loop
        if not 0 < device.device_type <= 0xFFFF_FFFF:
            raise DeviceError(f"{device.id}: virtio device type {device.device_type} is invalid")
        sizes = list(device.queue_max_sizes)
        for size in sizes:
            if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise DeviceError(f"{device.id}: queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.offered_features = device.features() & ~UNSUPPORTED_FEATURES & 0xFFFF_FFFF_FFFF_FFFF
        if not self.offered_features & VIRTIO_F_VERSION_1:
            raise DeviceError(f"{device.id}: virtio-mmio version 2 needs VIRTIO_F_VERSION_1")
        self.queues = [Virtqueue(size, memory, index) for index, size in enumerate(sizes)]
        for queue in self.queues:
            queue.on_error = self._queue_failed
        self.queue_events: list[int] = []
        try:
            for _ in sizes:
                self.queue_events.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError as exc:
            self._close_events()
            raise DeviceError(f"{device.id}: cannot create queue eventfds: {exc}") from None
        self.interrupt = MmioInterrupt(self)
        self._lock = threading.RLock()  # register state; vCPU threads
        self._isr_lock = threading.Lock()  # InterruptStatus; vCPU and event-loop threads
        self._cleanups: list[Callable[[], None]] = []
        self._closed = False
        self.interrupt_status = 0
        self.config_generation = 0
        self._config_snapshot = b""
        self._counts = {"notifications_trapped": 0, "interrupts": 0, "resets": 0, "activations": 0}
        self._reset_registers()

    # -- state -----------------------------------------------------------------------------

    def _reset_registers(self) -> None:
        self.status = 0
        self.needs_reset = False
        self.active = False
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        with self._isr_lock:
            self.interrupt_status = 0
        self._config_snapshot = self._config_bytes()

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` on :meth:`close`, before the eventfds are closed (ioeventfds)."""
        self._cleanups.append(cleanup)

    @property
    def device_status(self) -> int:
        """Status as the driver reads it."""
        status = self.status
        if self.needs_reset or self.device.broken is not None:
            status |= DEVICE_NEEDS_RESET
        return status

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _queue_setup_allowed(self) -> bool:
        return (self.status & FEATURES_OK != 0 and self.status & (DRIVER_OK | FAILED) == 0
                and not self.needs_reset)

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
            if self.device_features_sel > 1:
                return 0
            return (self.offered_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
        if offset == QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            queue = self._selected_queue()
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.device_status
        if SHM_LEN_LOW <= offset <= SHM_BASE_HIGH:
            return 0xFFFF_FFFF  # no shared memory region has the selected id
        if offset == CONFIG_GENERATION:
            current = self._config_bytes()
            with self._isr_lock:
                if current != self._config_snapshot:
                    self._config_snapshot = current
                    self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
                return self.config_generation
        return 0  # write-only or reserved

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES:
            if (self.status & DRIVER and not self.status & (FEATURES_OK | FAILED)
                    and self.driver_features_sel < 2):
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
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
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.acknowledge_interrupt(value)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
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

    def _config_bytes(self) -> bytes:
        try:
            return bytes(self.device.config_space())
        except Exception:
            log.exception("virtio.config_space_failed", device=self.id)
            return b""

    # -- status ----------------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & FAILED and not self.status & FAILED:
            self.status |= FAILED
            log.debug("virtio.driver_failed", device=self.id)
        if self.status & FAILED:
            return
        if value & self.status != self.status:
            log.debug("virtio.status_ignored", device=self.id, status=self.status, written=value)
            return
        new = value & ~self.status
        for bit in (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK):
            if not new & bit:
                continue
            if not self._may_set(bit):
                log.debug("virtio.status_refused", device=self.id, status=self.status, bit=bit)
                return
            self.status |= bit
            if bit == DRIVER_OK:
                self._activate()

    def _may_set(self, bit: int) -> bool:
        if bit == ACKNOWLEDGE:
            return True
        if bit == DRIVER:
            return bool(self.status & ACKNOWLEDGE)
        if bit == FEATURES_OK:
            return bool(self.status & DRIVER) and self._accept_features()
        return bool(self.status & FEATURES_OK) and not self.needs_reset  # DRIVER_OK

    def _accept_features(self) -> bool:
        features = self.driver_features
        if features & ~self.offered_features or not features & VIRTIO_F_VERSION_1:
            log.info("virtio.features_refused", device=self.id, offered=hex(self.offered_features),
                     requested=hex(features))
            return False
        self.device.ack_features(features)
        return True

    def _activate(self) -> None:
        features = self.driver_features
        try:
            for queue in self.queues:
                queue.set_features(features)
            for queue in self.queues:
                if queue.ready:
                    queue.validate()
            context = ActivationContext(
                memory=self.memory, queues=tuple(self.queues), queue_events=tuple(self.queue_events),
                interrupt=self.interrupt, event_loop=self.event_loop,
            )
            self.device.activate(context)
        except VirtqueueError as exc:
            self.fail(str(exc))
        except Exception as exc:
            log.exception("virtio.activate_failed", device=self.id)
            self.fail(f"activation failed: {exc}")
        else:
            self.active = True
            self._counts["activations"] += 1
            log.debug("virtio.activated", device=self.id, features=hex(features),
                      queues=sum(q.ready for q in self.queues))
            if self.on_event is not None:
                self.on_event("activated")

    def fail(self, reason: str) -> None:
        """The device cannot go on until the driver resets it: set ``DEVICE_NEEDS_RESET`` and,
        after ``DRIVER_OK``, tell the driver with a configuration-change interrupt."""
        first = not self.needs_reset
        self.needs_reset = True
        if first:
            log.warning("virtio.needs_reset", device=self.id, reason=reason)
            if self.status & DRIVER_OK:
                self.raise_interrupt(INT_CONFIG)

    def _queue_failed(self, exc: VirtqueueError) -> None:
        # Runs with the queue's lock held, often on the event loop: take no transport lock.
        self.fail(str(exc))

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status, or the VM reboots)."""
        with self._lock:
            try:
                self.device.reset()
            except Exception:
                log.exception("virtio.device_reset_failed", device=self.id)
            for queue in self.queues:
                queue.reset()
            self._drain_events()
            self._reset_registers()
            self._counts["resets"] += 1
        log.debug("virtio.reset", device=self.id)
        if self.on_event is not None:
            self.on_event("reset")

    def _drain_events(self) -> None:
        for fd in self.queue_events:
            try:
                os.eventfd_read(fd)
            except (BlockingIOError, OSError):
                pass

    # -- notifications and interrupts ------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """A QueueNotify write that no ioeventfd took: signal the queue's eventfd."""
        if queue_index >= len(self.queue_events) or self._closed:
            return
        self._counts["notifications_trapped"] += 1
        try:
            os.eventfd_write(self.queue_events[queue_index], 1)
        except OSError:
            pass

    def raise_interrupt(self, bits: int) -> None:
        """Set InterruptStatus ``bits`` and pulse the line."""
        with self._isr_lock:
            self.interrupt_status |= bits
            if bits & INT_CONFIG:
                self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            self._counts["interrupts"] += 1
        self.line.trigger()

    def acknowledge_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status &= ~bits
            again = self.interrupt_status != 0
        if again:
            self.line.trigger()

    # -- lifecycle -------------------------------------------------------------------------

    def pause(self) -> None:
        self.device.pause()

    def resume(self) -> None:
        self.device.resume()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.device.close()
        finally:
            for cleanup in self._cleanups:
                try:
                    cleanup()
                except Exception:
                    log.exception("virtio.cleanup_failed", device=self.id)
            self._cleanups.clear()
            self._close_events()

    def _close_events(self) -> None:
        for fd in self.queue_events:
            try:
                os.close(fd)
            except OSError:
                pass
        self.queue_events = []

    def counters(self) -> Mapping[str, int]:
        return {**self._counts, **self.device.counters()}

    def firmware_properties(self) -> Mapping[str, Any]:
        return {"virtio_device_type": self.device.device_type}

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "mmio", "device_type": self.device.device_type, "status": self.device_status,
            "offered_features": self.offered_features, "driver_features": self.driver_features,
            "interrupt_status": self.interrupt_status, "config_generation": self.config_generation,
            "queues": [queue.describe() for queue in self.queues], **self.device.describe(),
        }
