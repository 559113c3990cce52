"""What the two virtio transports share (virtio 1.2, sections 2.1, 2.2 and 3.1): device status,
feature negotiation, activation with :class:`Virtqueue` objects, reset, ``DEVICE_NEEDS_RESET``,
the per-queue notification eventfds and the configuration generation. A transport
(:mod:`vmmkit.virtio.mmio`, :mod:`vmmkit.pci.virtio`) keeps its register layout and its
interrupt delivery, and holds one :class:`TransportCore`.

Status: ``ACKNOWLEDGE`` -> ``DRIVER`` -> ``FEATURES_OK`` -> ``DRIVER_OK``. Bits may be set
together but only in that order; a write that would clear bits is ignored (writing 0 resets);
``FAILED`` may be set at any time and then nothing else is until reset. ``FEATURES_OK`` sticks
only if the driver's features are a subset of those offered, include ``VIRTIO_F_VERSION_1`` and
the device takes them; otherwise the bit stays clear, which is how the driver learns.
``DRIVER_OK`` (refused while ``DEVICE_NEEDS_RESET`` reads set) asks the transport for the
virtqueues, validates the ready ones against guest memory and activates the device with an
:class:`ActivationContext`.

``DEVICE_NEEDS_RESET`` reads set while ``device.broken`` is, or after a queue error or a failed
activation (:meth:`TransportCore.fail`); the first time it appears after ``DRIVER_OK`` the driver
gets a configuration-change interrupt (virtio 1.2, 2.1.2).

Locking: the transport calls :meth:`~TransportCore.write_status`, :meth:`~TransportCore.reset` and
the feature accessors holding its register lock (vCPU threads). :meth:`~TransportCore.fail` may
run with a queue's lock held, often on the event loop: it takes no lock of its own and reaches the
transport only through ``interrupt.trigger``, whose interrupt path must not take the register lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.state import NotSnapshottable, StateError, check_version, field, int_field, is_snapshottable
from vmmkit.virtio.chain import MAX_QUEUE_SIZE, VirtqueueError
from vmmkit.virtio.device import (
    VIRTIO_F_VERSION_1,
    ActivationContext,
    VirtioDevice,
    VirtioInterrupt,
    VirtioInterruptType,
)

if TYPE_CHECKING:
    from vmmkit.eventloop import EventLoop
    from vmmkit.memory import GuestMemory
    from vmmkit.virtio.queue import Virtqueue

log = get_logger()

# Device status bits (virtio 1.2, 2.1).
ACKNOWLEDGE: Final = 0x01
DRIVER: Final = 0x02
DRIVER_OK: Final = 0x04
FEATURES_OK: Final = 0x08
DEVICE_NEEDS_RESET: Final = 0x40
FAILED: Final = 0x80


class TransportCore:
    """The transport-independent state of one virtio device behind a transport.

    :param device: the virtio device; its ``on_broken`` is pointed at :meth:`fail`.
    :param name: the device's name in logs.
    :param memory: guest RAM, for the activation context.
    :param event_loop: where the device processes its queue events.
    :param interrupt: the transport's interrupt, for the device and for :meth:`fail`.
    :param unsupported_features: feature bits the transport never offers.
    :param virtqueues: called at ``DRIVER_OK``: the queues as the driver set them up.
    :param reset_registers: called on reset: the transport forgets its own registers (queue
        setup, selectors, interrupt status).
    :param log_prefix: the transport's prefix of log event names (``"virtio"``, ``"virtio_pci"``).
    """

    def __init__(self, device: VirtioDevice, *, name: str, memory: GuestMemory, event_loop: EventLoop,
                 interrupt: VirtioInterrupt, unsupported_features: int,
                 virtqueues: Callable[[], Sequence[Virtqueue]], reset_registers: Callable[[], None],
                 log_prefix: str) -> None:
        for size in device.queue_max_sizes:
            if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise DeviceError(f"{device.id}: queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.offered_features = int(device.features()) & ~unsupported_features & 0xFFFF_FFFF_FFFF_FFFF
        if not self.offered_features & VIRTIO_F_VERSION_1:
            raise DeviceError(f"{device.id}: virtio 1.x transports need VIRTIO_F_VERSION_1")
        self.device = device
        self.name = name
        self.memory = memory
        self.event_loop = event_loop
        self.interrupt = interrupt
        self._virtqueues = virtqueues
        self._reset_registers = reset_registers
        self._prefix = log_prefix
        #: Called with "activated" / "reset" (the machine turns it into an event); optional.
        self.on_event: Callable[[str], None] | None = None
        self.queue_events: list[int] = []
        try:
            for _ in device.queue_max_sizes:
                self.queue_events.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError as exc:
            self.close_events()
            raise DeviceError(f"{device.id}: cannot create queue eventfds: {exc}") from None
        device.on_broken = self.fail
        self.counts = {"notifications_trapped": 0, "interrupts": 0, "resets": 0, "activations": 0}
        self.closed = False
        self.status = 0
        self.driver_features = 0
        self.needs_reset = False
        self.active = False
        self._generation_lock = threading.Lock()
        #: The configuration generation, unbounded: a transport masks it to its register's width.
        self.generation = 0
        self._config_snapshot = self._config_bytes()

    # -- status ------------------------------------------------------------------------------

    @property
    def device_status(self) -> int:
        """Status as the driver reads it."""
        broken = self.needs_reset or self.device.broken is not None
        return self.status | (DEVICE_NEEDS_RESET if broken else 0)

    def write_status(self, value: int) -> None:
        """The driver wrote ``value`` (8 bits) to the device status."""
        if value == 0:
            self.reset()
            return
        if value & FAILED and not self.status & FAILED:
            self.status |= FAILED
            log.debug(f"{self._prefix}.driver_failed", device=self.name)
        if self.status & FAILED:
            return
        if value & self.status != self.status:
            log.debug(f"{self._prefix}.status_ignored", device=self.name, status=self.status, written=value)
            return
        new = value & ~self.status
        for bit in (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK):
            if not new & bit:
                continue
            if not self._may_set(bit):
                log.debug(f"{self._prefix}.status_refused", device=self.name, status=self.status, bit=bit)
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

    def queue_setup_locked(self) -> bool:
        """Whether queue registers are read-only now: after ``DRIVER_OK`` or ``FAILED``, or
        while ``DEVICE_NEEDS_RESET`` is set."""
        return bool(self.status & (DRIVER_OK | FAILED)) or self.needs_reset

    # -- features ----------------------------------------------------------------------------

    def device_feature_bits(self, select: int) -> int:
        """Offered features ``32 * select`` to ``32 * select + 31``."""
        return (self.offered_features >> (32 * select)) & 0xFFFF_FFFF if select <= 1 else 0

    def driver_feature_bits(self, select: int) -> int:
        """Driver features ``32 * select`` to ``32 * select + 31``."""
        return (self.driver_features >> (32 * select)) & 0xFFFF_FFFF if select <= 1 else 0

    def write_driver_feature_bits(self, select: int, value: int) -> None:
        """The driver wrote features ``32 * select`` onwards; ignored from ``FEATURES_OK`` or
        ``FAILED`` on."""
        if select <= 1 and not self.status & (FEATURES_OK | FAILED):
            shift = 32 * select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _accept_features(self) -> bool:
        features = self.driver_features
        if features & ~self.offered_features or not features & VIRTIO_F_VERSION_1:
            log.info(f"{self._prefix}.features_refused", device=self.name, offered=hex(self.offered_features),
                     requested=hex(features))
            return False
        try:
            self.device.ack_features(features)
        except Exception:
            log.exception(f"{self._prefix}.ack_features_failed", device=self.name)
            return False
        return self.device.broken is None

    # -- activation, failure, reset ----------------------------------------------------------

    def _activate(self, positions: Sequence[Mapping[str, Any]] = ()) -> None:
        """``DRIVER_OK``: validate the ready queues and hand them to the device. A queue the
        guest misplaced, or a device that cannot start, sets ``DEVICE_NEEDS_RESET`` instead of
        raising into the vCPU. ``positions``: each queue's ring positions (a restore)."""
        features = self.driver_features
        try:
            queues = self._virtqueues()
            for queue in queues:
                queue.set_features(features)
                queue.on_error = self._queue_failed
            for queue, position in zip(queues, positions, strict=False):
                queue.restore_position(position)
            for queue in queues:
                if queue.ready:
                    queue.validate()
            self.device.activate(ActivationContext(
                memory=self.memory, queues=tuple(queues), queue_events=tuple(self.queue_events),
                interrupt=self.interrupt, event_loop=self.event_loop,
            ))
        except VirtqueueError as exc:
            self.fail(str(exc))
            return
        except Exception as exc:
            log.exception(f"{self._prefix}.activate_failed", device=self.name)
            self.fail(f"activation failed: {exc}")
            return
        self.active = True
        self.counts["activations"] += 1
        log.debug(f"{self._prefix}.activated", device=self.name, features=hex(features),
                  queues=sum(queue.ready for queue in queues))
        if self.on_event is not None:
            self.on_event("activated")

    def fail(self, reason: str) -> None:
        """The device cannot go on until the driver resets it: set ``DEVICE_NEEDS_RESET`` and,
        after ``DRIVER_OK``, tell the driver with a configuration-change interrupt."""
        first = not self.needs_reset
        self.needs_reset = True
        if first:
            log.warning(f"{self._prefix}.needs_reset", device=self.name, reason=reason)
            if self.status & DRIVER_OK:
                self.interrupt.trigger(VirtioInterruptType.CONFIG)

    def _queue_failed(self, exc: VirtqueueError) -> None:
        # Runs with the queue's lock held, often on the event loop: take no transport lock.
        self.fail(str(exc))

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to the status, or the VM resets); call with the
        transport's register lock held."""
        try:
            self.device.reset()
        except Exception:
            log.exception(f"{self._prefix}.device_reset_failed", device=self.name)
        self._reset_registers()
        for fd in self.queue_events:  # kicks for the old queues
            try:
                os.eventfd_read(fd)
            except OSError:
                pass
        self.status = 0
        self.driver_features = 0
        self.needs_reset = False
        self.active = False
        current = self._config_bytes()
        with self._generation_lock:
            self._config_snapshot = current
        self.counts["resets"] += 1
        log.debug(f"{self._prefix}.reset", device=self.name)
        if self.on_event is not None:
            self.on_event("reset")

    # -- snapshots (the transports' save_state / restore_state) -------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self, queues: Sequence[Virtqueue]) -> dict[str, Any]:
        """Status, features, the configuration generation, the ring positions of the active
        queues and the device's own state (:class:`vmmkit.state.Snapshottable`).

        :raises NotSnapshottable: the device does not implement the contract."""
        device = self.device
        if not is_snapshottable(device):
            raise NotSnapshottable(f"virtio device {device.id} ({type(device).__name__}) does not implement "
                                   "the snapshot contract (vmmkit.state.Snapshottable)")
        return {
            "status": self.status, "driver_features": self.driver_features, "needs_reset": self.needs_reset,
            "generation": self.generation, "active": self.active,
            "queues": [queue.position() for queue in queues] if self.active else [],
            "device": {"version": device.state_version, "state": device.save_state()},  # type: ignore[attr-defined]
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take :meth:`save_state`'s state; the transport has restored its queue registers
        first. An active device is activated again with its rings where they were."""
        what = f"{self.name}.virtio"
        status = int_field(state, "status", what, 0, 0xFF)
        features = int_field(state, "driver_features", what)
        generation = int_field(state, "generation", what)
        needs_reset = field(state, "needs_reset", bool, what)
        active = field(state, "active", bool, what)
        positions = field(state, "queues", list, what)
        saved = field(state, "device", dict, what)
        device = self.device
        if not is_snapshottable(device):
            raise StateError(f"virtio device {device.id} ({type(device).__name__}) cannot restore state")
        check_version(f"virtio device {device.id}", saved.get("version"), device.state_version)  # type: ignore[attr-defined]
        if features & ~self.offered_features:
            raise StateError(f"{what}: the driver features {features:#x} were not offered by this device "
                             f"({self.offered_features:#x})")
        if active and len(positions) != len(device.queue_max_sizes):
            raise StateError(f"{what}: {len(positions)} queue positions for {len(device.queue_max_sizes)} queues")
        self.status, self.driver_features, self.needs_reset = status, features, needs_reset
        self.generation = generation
        if status & FEATURES_OK:
            device.ack_features(features)
        device.restore_state(field(saved, "state", dict, f"{what}.device"))  # type: ignore[attr-defined]
        self._config_snapshot = self._config_bytes()
        if active:
            self._activate(positions)
            if not self.active:
                raise StateError(f"{what}: the device could not be activated again: {device.broken or 'see the log'}")

    # -- configuration generation ------------------------------------------------------------

    def read_generation(self) -> int:
        """The driver reads the configuration generation: :attr:`generation`, first bumped if
        the device's configuration space changed since the driver last looked."""
        current = self._config_bytes()
        with self._generation_lock:
            if current != self._config_snapshot:
                self._config_snapshot = current
                self.generation += 1
            return self.generation

    def bump_generation(self) -> None:
        """A configuration-change interrupt: the driver must re-read the configuration."""
        with self._generation_lock:
            self.generation += 1

    def _config_bytes(self) -> bytes:
        try:
            return bytes(self.device.config_space())
        except Exception:
            log.exception(f"{self._prefix}.config_space_failed", device=self.name)
            return b""

    # -- notifications and lifecycle ---------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """A queue notification that no ioeventfd took: signal the queue's eventfd."""
        if not 0 <= queue_index < len(self.queue_events) or self.closed:
            return
        self.counts["notifications_trapped"] += 1
        try:
            os.eventfd_write(self.queue_events[queue_index], 1)
        except OSError as exc:
            log.warning(f"{self._prefix}.notify_failed", device=self.name, queue=queue_index, error=str(exc))

    def counters(self) -> Mapping[str, int]:
        return {**self.counts, **self.device.counters()}

    def close(self, release: Callable[[], None]) -> None:
        """Close the device, then ``release`` what the transport holds on the eventfds
        (ioeventfds), then the eventfds; only the first call does anything."""
        if self.closed:
            return
        self.closed = True
        try:
            self.device.close()
        finally:
            release()
            self.close_events()

    def close_events(self) -> None:
        events, self.queue_events = self.queue_events, []
        for fd in events:
            try:
                os.close(fd)
            except OSError:
                pass
