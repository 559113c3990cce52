"""The split virtqueue (virtio 1.2, section 2.7), device side.

The transport fills in a :class:`Virtqueue`'s size, ring addresses and ``ready`` from the
driver's register writes and, at ``DRIVER_OK``, the negotiated features
(:meth:`Virtqueue.set_features`) and :meth:`Virtqueue.validate`. A device then serves it
from its queue event::

    def on_queue_event(self) -> None:
        try:
            while (chain := queue.pop()) is not None:
                written = self.handle(chain)          # chain.read(), chain.write(...)
                queue.add_used(chain.head, written)
            if queue.needs_notification():
                interrupt.trigger(VirtioInterruptType.QUEUE, queue.index)
        except VirtqueueError as exc:
            self.mark_broken(str(exc))

Every value the driver wrote is hostile: ring placement and size are checked against guest
RAM with the spec's alignment (descriptor table 16, available ring 2, used ring 4, each ring
inside one memory region, as Linux allocates them), the available index may not run more than
a queue size ahead, and chains are walked by :mod:`vmmkit.virtio.chain` (native when built,
with the Python walker as fallback and oracle). A protocol violation raises
:class:`VirtqueueError` (and nothing else) and leaves the queue :attr:`~Virtqueue.broken`: it
pops nothing more until :meth:`~Virtqueue.reset`. The transport hears of it through
:attr:`Virtqueue.on_error` (to set ``DEVICE_NEEDS_RESET``).

Notification suppression: without ``VIRTIO_F_EVENT_IDX`` the queue honours
``VIRTQ_AVAIL_F_NO_INTERRUPT`` and sets ``VIRTQ_USED_F_NO_NOTIFY`` while notifications are
disabled; with it, :meth:`~Virtqueue.pop` publishes ``avail_event`` (as QEMU does, so a device
that only pops never misses a kick) and :meth:`~Virtqueue.needs_notification` applies
``vring_need_event`` to ``used_event``. ``pop``, ``add_used`` and ``needs_notification`` are
meant for one thread (the event loop); the transport's writes and resets may come from vCPU
threads and take the queue's lock.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from vmmkit.virtio.chain import (
    DEFAULT_MAX_SEGMENTS,
    MAX_QUEUE_SIZE,
    ChainWalker,
    DescriptorChain,
    ErrorKind,
    RegionTable,
    Segment,
    VirtqueueError,
    fence,
    native_available,
    native_unavailable_reason,
)
from vmmkit.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

if TYPE_CHECKING:
    from vmmkit.memory import GuestMemory

VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

_T = TypeVar("_T")
_U16 = struct.Struct("<H")


def _load_u16(buffer: Any, offset: int) -> int:
    """One 16-bit load of a ring index or flags word the driver may be writing: struct's ``<H``
    reads byte by byte (high byte first), so a value changing from 0x00ff to 0x0100 under it could
    read as 0x0000. A native ``H`` memoryview item is one load (virtio is little-endian, and so
    is every host vmmkit runs on)."""
    with memoryview(buffer) as view, view[offset:offset + 2] as piece, piece.cast("H") as word:
        value: int = word[0]
        return value


def _store_u16(buffer: Any, offset: int, value: int) -> None:
    """One 16-bit store (struct's ``pack_into`` writes byte by byte: a driver polling the used
    index could see it torn, e.g. 0x0000 between 0x00ff and 0x0100)."""
    with memoryview(buffer) as view, view[offset:offset + 2] as piece, piece.cast("H") as word:
        word[0] = value


if sys.byteorder != "little":  # pragma: no cover - no big-endian host here
    def _load_u16(buffer: Any, offset: int) -> int:
        value: int = _U16.unpack_from(buffer, offset)[0]
        return value

    def _store_u16(buffer: Any, offset: int, value: int) -> None:
        _U16.pack_into(buffer, offset, value)
_USED_ELEM = struct.Struct("<II")

__all__ = ["DescriptorChain", "ErrorKind", "Segment", "Virtqueue", "VirtqueueError",
           "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_USED_F_NO_NOTIFY"]


def ring_sizes(queue_size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (event fields included)."""
    return 16 * queue_size, 6 + 2 * queue_size, 6 + 8 * queue_size


class _Layout:
    """The validated rings of an active queue: (buffer, offset) pairs into guest memory."""

    __slots__ = ("table", "walker", "avail_buf", "avail_off", "used_buf", "used_off", "size")

    def __init__(self, table: RegionTable, walker: ChainWalker, avail: tuple[Any, int],
                 used: tuple[Any, int], size: int) -> None:
        self.table = table
        self.walker = walker
        self.avail_buf, self.avail_off = avail
        self.used_buf, self.used_off = used
        self.size = size


class Virtqueue:
    """One split virtqueue of a device.

    :param max_size: the largest size the device supports (a power of two <= 32768).
    :param memory: the guest's RAM.
    :param index: the queue's number within its device (for logs and interrupts).
    :param max_segments: the most segments one chain may have.
    :param native: use the C walker (``None``: when it is built).
    """

    def __init__(self, max_size: int, memory: GuestMemory, index: int = 0, *,
                 max_segments: int = DEFAULT_MAX_SEGMENTS, native: bool | None = None) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        if not 1 <= max_segments <= 0xFFFF_FFFF:
            raise ValueError(f"max_segments {max_segments} out of range")
        if native and not native_available():
            raise ValueError(f"the native walker is unavailable: {native_unavailable_reason()}")
        self.max_size = max_size
        self.memory = memory
        self.index = index
        self.max_segments = max_segments
        self.native = native
        #: Called (with the error) when the guest breaks the protocol; set by the transport.
        self.on_error: Callable[[VirtqueueError], None] | None = None
        self._lock = threading.RLock()
        self._layout: _Layout | None = None
        self._walker: ChainWalker | None = None
        self.reset()

    # -- configuration (the transport) -----------------------------------------------------

    def reset(self) -> None:
        """Back to the state after device reset (the driver must set the queue up again)."""
        with self._lock:
            self.size = self.max_size
            self.ready = False
            self.desc_table = 0
            self.avail_ring = 0
            self.used_ring = 0
            self.event_idx = False
            self.indirect = False
            self.last_avail_idx = 0
            self.next_used = 0
            self.broken: str | None = None
            self._signalled_used: int | None = None
            self._notify = True
            self._layout = None

    # -- snapshots ----------------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """Where the device is in the rings (the driver's side is in guest memory)."""
        with self._lock:
            return {"last_avail_idx": self.last_avail_idx, "next_used": self.next_used,
                    "signalled_used": self._signalled_used, "notify": self._notify}

    def restore_position(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import StateError, field, int_field

        what = f"queue{self.index}"
        last_avail = int_field(state, "last_avail_idx", what, 0, 0xFFFF)
        next_used = int_field(state, "next_used", what, 0, 0xFFFF)
        signalled = state.get("signalled_used")
        if signalled is not None and (not isinstance(signalled, int) or not 0 <= signalled <= 0xFFFF):
            raise StateError(f"{what}.signalled_used: expected a 16-bit index or null")
        notify = field(state, "notify", bool, what)
        with self._lock:
            self.last_avail_idx, self.next_used = last_avail, next_used
            self._signalled_used, self._notify = signalled, notify

    def set_features(self, features: int) -> None:
        """The negotiated features that change how the rings are used."""
        with self._lock:
            self.event_idx = bool(features & VIRTIO_F_EVENT_IDX)
            self.indirect = bool(features & VIRTIO_F_INDIRECT_DESC)

    def validate(self) -> None:
        """Check size and ring placement against guest memory (the transport calls this at
        ``DRIVER_OK`` for each ready queue); raises :class:`VirtqueueError`."""
        with self._lock:
            self._guarded(self._setup)

    def _setup(self) -> _Layout:
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(ErrorKind.RING, f"queue {self.index}: size {size} is not a power of two "
                                 f"<= {self.max_size}")
        table = self._layout.table if self._layout is not None else RegionTable(self.memory)
        if not table.is_current(self.memory):
            table = RegionTable(self.memory)
        desc_len, avail_len, used_len = ring_sizes(size)
        places = []
        for name, gpa, length, align in (("descriptor table", self.desc_table, desc_len, 16),
                                         ("available ring", self.avail_ring, avail_len, 2),
                                         ("used ring", self.used_ring, used_len, 4)):
            found = table.translate(gpa, length) if gpa % align == 0 else None
            if found is None:
                raise VirtqueueError(ErrorKind.RING, f"queue {self.index}: {name} {gpa:#x}+{length:#x} is "
                                     f"not {align}-aligned inside one guest memory region")
            places.append(found)
        used_region, used_off = places[2]
        if used_region.readonly:
            raise VirtqueueError(ErrorKind.RING, f"queue {self.index}: used ring is in read-only memory")
        if self._walker is None or self._walker.table is not table:
            self._walker = ChainWalker(table, self.max_segments, native=self.native)
        avail_region, avail_off = places[1]
        self._layout = _Layout(table, self._walker, (avail_region.buffer, avail_off),
                               (used_region.buffer, used_off), size)
        return self._layout

    def _current(self) -> _Layout:
        layout = self._layout
        if layout is None or layout.size != self.size or not layout.table.is_current(self.memory):
            layout = self._setup()
        return layout

    def _guarded(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation``; a protocol error leaves the queue broken and reaches on_error."""
        try:
            return operation()
        except VirtqueueError as exc:
            self._break(exc)
            raise
        except (ValueError, OverflowError, struct.error) as exc:  # guest memory went away under us
            error = VirtqueueError(ErrorKind.RING, f"queue {self.index}: guest memory is gone ({exc})")
            self._break(error)
            raise error from None

    def _break(self, exc: VirtqueueError) -> None:
        first = self.broken is None
        self.broken = str(exc)
        if first and self.on_error is not None:
            self.on_error(exc)

    # -- the device's side ------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.ready and self.broken is None

    def pending(self) -> int:
        """Chains the driver has made available that were not popped yet."""
        with self._lock:
            if not self.active:
                return 0
            return self._guarded(lambda: self._pending(self._current()))

    def _pending(self, layout: _Layout) -> int:
        avail_idx = _load_u16(layout.avail_buf, layout.avail_off + 2)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > layout.size:
            raise VirtqueueError(ErrorKind.AVAIL_INDEX, f"queue {self.index}: available index moved from "
                                 f"{self.last_avail_idx} to {avail_idx} (size {layout.size})")
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when there is none (or the queue is not ready
        or broken). Raises :class:`VirtqueueError` if the guest broke the protocol."""
        with self._lock:
            if not self.active:
                return None
            return self._guarded(self._pop)

    def _pop(self) -> DescriptorChain | None:
        layout = self._current()
        if self.event_idx:
            fence()  # our avail_event store before the avail idx load
        if self._pending(layout) == 0:
            return None
        fence()  # the avail idx load before the ring entry and descriptor loads
        slot = self.last_avail_idx % layout.size
        head: int = _U16.unpack_from(layout.avail_buf, layout.avail_off + 4 + 2 * slot)[0]
        chain = layout.walker.walk(self.desc_table, layout.size, head, indirect=self.indirect)
        chain.memory = self.memory
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self._notify:
            self._write_avail_event(layout, self.last_avail_idx)
        return chain

    def undo_pop(self) -> None:
        """Give back the chain the last :meth:`pop` returned, unserved: the next pop returns it
        again (a rate-limited device leaves it in the available ring; rust-vmm's
        ``Queue::go_to_previous_position``). Only right after a pop of this queue."""
        with self._lock:
            if not self.active:
                return

            def undo() -> None:
                layout = self._current()
                self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
                if self.event_idx and self._notify:
                    self._write_avail_event(layout, self.last_avail_idx)

            self._guarded(undo)

    def chain_at(self, head: int) -> DescriptorChain:
        """Chain ``head`` walked afresh, not taken from the available ring: a vhost-user backend
        resubmitting what its predecessor had taken (vhost-user.rst, "Inflight I/O tracking").
        Raises :class:`VirtqueueError` (the queue inactive, or the chain broken)."""
        with self._lock:
            if not self.active:
                raise VirtqueueError(ErrorKind.DEVICE, f"queue {self.index} is not active")

            def walk() -> DescriptorChain:
                layout = self._current()
                if not 0 <= head < layout.size:
                    raise VirtqueueError(ErrorKind.INDEX, f"queue {self.index}: head {head} beyond size {layout.size}")
                chain = layout.walker.walk(self.desc_table, layout.size, head, indirect=self.indirect)
                chain.memory = self.memory
                return chain

            return self._guarded(walk)

    def iter_available(self) -> Iterator[DescriptorChain]:
        """Pop chains until none is left (a :class:`VirtqueueError` ends the iteration)."""
        while (chain := self.pop()) is not None:
            yield chain

    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it."""
        with self._lock:
            if not self.active:
                return
            self._guarded(lambda: self._add_used(head, written))

    def _add_used(self, head: int, written: int) -> None:
        layout = self._current()
        if not 0 <= head < layout.size:
            raise VirtqueueError(ErrorKind.DEVICE, f"queue {self.index}: add_used of head {head}")
        written = min(max(written, 0), 0xFFFF_FFFF)
        slot = self.next_used % layout.size
        _USED_ELEM.pack_into(layout.used_buf, layout.used_off + 4 + 8 * slot, head, written)
        fence()  # the element before the index that publishes it
        self.next_used = (self.next_used + 1) & 0xFFFF
        _store_u16(layout.used_buf, layout.used_off + 2, self.next_used)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used buffers added since the last
        call (``VIRTQ_AVAIL_F_NO_INTERRUPT``, or ``used_event`` with ``VIRTIO_F_EVENT_IDX``)."""
        with self._lock:
            if not self.active:
                return False
            return self._guarded(self._needs_notification)

    def _needs_notification(self) -> bool:
        layout = self._current()
        fence()  # the used idx store before the flags / used_event load
        if not self.event_idx:
            flags = _load_u16(layout.avail_buf, layout.avail_off)
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = _load_u16(layout.avail_buf, layout.avail_off + 4 + 2 * layout.size)
        new, old = self.next_used, self._signalled_used
        self._signalled_used = new
        if old is None:
            return True
        # vring_need_event(): did new_idx pass used_event since old?
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def set_avail_event(self, index: int | None = None) -> None:
        """Ask for a notification once the driver makes entry ``index`` (default: the next
        one we will pop) available; meaningful with ``VIRTIO_F_EVENT_IDX``."""
        with self._lock:
            if not self.active:
                return
            value = self.last_avail_idx if index is None else index & 0xFFFF
            self._guarded(lambda: self._write_avail_event(self._current(), value))

    def _write_avail_event(self, layout: _Layout, value: int) -> None:
        _store_u16(layout.used_buf, layout.used_off + 4 + 8 * layout.size, value)

    def disable_notification(self) -> None:
        """Tell the driver not to notify (while the device is polling the queue anyway)."""
        with self._lock:
            if not self.active:
                return
            self._notify = False
            if not self.event_idx:
                self._guarded(lambda: self._set_used_flags(VIRTQ_USED_F_NO_NOTIFY))

    def enable_notification(self) -> bool:
        """Ask for notifications again; ``True`` if chains arrived meanwhile (pop them, or a
        kick may never come)."""
        with self._lock:
            if not self.active:
                return False
            self._notify = True

            def enable() -> bool:
                layout = self._current()
                if self.event_idx:
                    self._write_avail_event(layout, self.last_avail_idx)
                else:
                    self._set_used_flags(0)
                fence()
                return self._pending(layout) > 0

            return self._guarded(enable)

    def _set_used_flags(self, flags: int) -> None:
        layout = self._current()
        _store_u16(layout.used_buf, layout.used_off, flags)

    def mark_broken(self, reason: str, kind: ErrorKind = ErrorKind.DEVICE) -> None:
        """Stop using the queue until reset (the device found the guest at fault); ``kind``
        when a device's own C ring code found a protocol error the walker would report."""
        with self._lock:
            self._break(VirtqueueError(kind, reason))

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index, "size": self.size, "max_size": self.max_size, "ready": self.ready,
            "desc_table": self.desc_table, "avail_ring": self.avail_ring, "used_ring": self.used_ring,
            "event_idx": self.event_idx, "indirect": self.indirect, "last_avail_idx": self.last_avail_idx,
            "next_used": self.next_used, "broken": self.broken,
            "native": self._walker.native if self._walker is not None else None,
        }
