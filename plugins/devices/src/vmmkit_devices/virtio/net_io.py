"""The virtio-net queues served in C (``native/net_queue.c``): the checked-bindings layer between
``vmmkit_devices.virtio._native`` (private ``ffi``/``lib``) and :class:`.net.NetDevice`, which
never touches ``ffi``.

:class:`NativeNetQueue` holds one ``struct netq``: both rings, the tap fd, the kick, wake and
irq eventfds, the negotiated features (``NETQ_F_*``, from :func:`queue_flags`), the receive
chains the device holds and a frame that waits for more of them. :meth:`NativeNetQueue.run`
serves on the calling thread until stopped, an interrupt to send, or a protocol error; cffi
releases the GIL meanwhile. ``VMMKIT_NET_NATIVE=0`` in the environment keeps the queues in Python.
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from vmmkit.memory import GuestMemory
    from vmmkit.virtio.queue import Virtqueue

#: ``struct netq``'s counters, in ``net_queue.h``'s order (NetDevice's names).
NET_COUNTERS: Final = ("rx_bytes", "rx_frames", "tx_bytes", "tx_frames", "rx_dropped", "tx_dropped",
                       "tx_errors", "rx_errors")


class NetRun(enum.IntEnum):
    """Why :meth:`NativeNetQueue.run` returned (``net_queue.h``'s ``NETQ_*``)."""

    STOPPED = 0  #: :meth:`NativeNetQueue.stop` was called
    SIGNAL = 1  #: queues want an interrupt and have no irqfd (:attr:`NativeNetQueue.signalled`)
    BROKEN = 2  #: the driver broke the protocol (:attr:`NativeNetQueue.error`)
    IDLE = 3  #: :meth:`NativeNetQueue.process` found nothing more to do


_ffi: Any = None
_lib: Any = None
_WALKER: Any = None
#: Why the C queues are not used ("" when they are).
NATIVE_NET_UNAVAILABLE_REASON = ""


def _load() -> None:
    """The plugin's C module and the SDK's C chain walker (``vmmkit.virtio._native``), whose
    address the C queue calls: the walker the SDK fuzzes is the one used."""
    global _ffi, _lib, _WALKER, NATIVE_NET_UNAVAILABLE_REASON
    if os.environ.get("VMMKIT_NET_NATIVE", "1") == "0":
        NATIVE_NET_UNAVAILABLE_REASON = "disabled by VMMKIT_NET_NATIVE=0"
        return
    try:
        from vmmkit_devices.virtio._native import ffi, lib
    except ImportError as exc:
        NATIVE_NET_UNAVAILABLE_REASON = (f"vmmkit_devices.virtio._native is not built ({exc}); "
                                         "pip install -e plugins/devices")
        return
    use(ffi, lib)


def use(ffi: Any, lib: Any) -> None:
    """Serve through this build of the C module (the sanitizer tests pass theirs)."""
    global _ffi, _lib, _WALKER, NATIVE_NET_UNAVAILABLE_REASON
    from vmmkit.virtio import chain

    if not chain.native_available():
        NATIVE_NET_UNAVAILABLE_REASON = f"the SDK's C walker is unavailable: {chain.native_unavailable_reason()}"
        return
    import importlib

    core = importlib.import_module("vmmkit.virtio._native")
    pairs = (("struct vq_region", "struct netq_vq_region", ("gpa", "size", "host", "readonly")),
             ("struct vq_memory", "struct netq_vq_memory", ("regions", "count")),
             ("struct vq_chain", "struct netq_vq_chain",
              ("count", "readable", "descriptors", "readable_bytes", "writable_bytes")))
    for theirs, ours, fields in pairs:
        if core.ffi.sizeof(theirs) != ffi.sizeof(ours) or any(
                core.ffi.offsetof(theirs, f) != ffi.offsetof(ours, f) for f in fields):
            NATIVE_NET_UNAVAILABLE_REASON = f"{theirs} differs from net_queue.h's {ours}"
            return
    if lib.NETQ_COUNTERS != len(NET_COUNTERS) or ffi.sizeof("struct iovec") != 16:
        NATIVE_NET_UNAVAILABLE_REASON = "vmmkit_devices.virtio._native disagrees with net_io.py"
        return
    address = int(core.ffi.cast("uintptr_t", core.ffi.addressof(core.lib, "vq_walk_chain")))
    _ffi, _lib = ffi, lib
    _WALKER = (ffi.cast("netq_walk_fn", address), core)
    NATIVE_NET_UNAVAILABLE_REASON = ""


_load()


def native_net_available() -> bool:
    """Whether a virtio-net device's queues can be served in C."""
    return _WALKER is not None


def queue_flags(*, event_idx: bool, indirect: bool, mrg_rxbuf: bool, guest_csum: bool, csum: bool,
                host_tso4: bool, host_tso6: bool, host_ecn: bool, host_ufo: bool) -> int:
    """``struct netq``'s ``NETQ_F_*`` bits from what the driver negotiated."""
    lib = _lib
    bits = ((event_idx, lib.NETQ_F_EVENT_IDX), (indirect, lib.NETQ_F_INDIRECT), (mrg_rxbuf, lib.NETQ_F_MRG_RXBUF),
            (guest_csum, lib.NETQ_F_GUEST_CSUM), (csum, lib.NETQ_F_CSUM), (host_tso4, lib.NETQ_F_HOST_TSO4),
            (host_tso6, lib.NETQ_F_HOST_TSO6), (host_ecn, lib.NETQ_F_HOST_ECN), (host_ufo, lib.NETQ_F_HOST_UFO))
    return sum(bit for on, bit in bits if on)


class NativeNetQueue:
    """A virtio-net device's two queues and its tap, served by ``native/net_queue.c``.

    :param memory: guest memory (its region table is copied; :meth:`refresh_memory` re-copies).
    :param tap_fd: the tap (non-blocking, 12-byte vnet header).
    :param wake_fd: an eventfd written after :meth:`stop`.
    :param max_segments: the most segments one chain may have.
    :param max_queue_size: the receive queue's largest size (receive chains the device may hold).
    """

    def __init__(self, memory: GuestMemory, *, tap_fd: int, wake_fd: int, max_segments: int,
                 max_queue_size: int) -> None:
        if _WALKER is None:
            raise RuntimeError(f"the native net queues are unavailable: {NATIVE_NET_UNAVAILABLE_REASON}")
        self.memory = memory
        q = _ffi.gc(_ffi.new("struct netq *"), _lib.netq_release)
        self._q = q
        self._iov = _ffi.new("struct iovec[]", max_segments + 1)
        self._gpa = _ffi.new("uint64_t[]", max_segments)
        self._held = _ffi.new("uint16_t[]", max_queue_size)
        self._held_bytes = _ffi.new("uint64_t[]", max_queue_size)
        self._frame = _ffi.new("uint8_t[]", 2 * _lib.NETQ_MAX_RX)
        self._max_queue_size = max_queue_size
        q.walk = _WALKER[0]
        q.iov, q.gpa, q.max_segments = self._iov, self._gpa, max_segments
        q.held, q.held_bytes, q.frame = self._held, self._held_bytes, self._frame
        q.tap_fd, q.wake_fd, q.epoll_fd = tap_fd, wake_fd, -1
        q.rx.kick_fd = q.tx.kick_fd = q.rx.irq_fd = q.tx.irq_fd = -1
        self._regions_source: tuple[Any, ...] = ()
        self._keep: tuple[Any, ...] = ()
        self.refresh_memory()

    def refresh_memory(self) -> bool:
        """Copy guest memory's region table again if it changed (memory hotplug); whether it did."""
        regions = self.memory.regions
        if regions == self._regions_source:
            return False
        array = _ffi.new("struct netq_vq_region[]", max(len(regions), 1))
        for slot, region in enumerate(regions):
            array[slot].gpa, array[slot].size = region.start, region.size
            array[slot].host = _ffi.cast("uint8_t *", region.host_address)
            array[slot].readonly = int(region.readonly)
        table = _ffi.new("struct netq_vq_memory *")
        table.regions, table.count = array, len(regions)
        self._q.vq_mem = table  # the queue is not running: the old table may go
        self._keep = (array, table)
        self._regions_source = regions
        return True

    def load(self, queues: tuple[Virtqueue, Virtqueue], kicks: tuple[int, int], irqfds: tuple[int, int],
             flags: int) -> None:
        """Take both queues' rings and positions (before :meth:`run`). Receive chains given back
        by :meth:`store` are popped again."""
        q = self._q
        q.flags = flags
        for ring, queue, kick, irqfd in zip((q.rx, q.tx), queues, kicks, irqfds, strict=True):
            active = queue.active and queue.size <= self._max_queue_size
            ring.desc_gpa, ring.avail_gpa, ring.used_gpa = queue.desc_table, queue.avail_ring, queue.used_ring
            ring.size = queue.size if active else 0
            ring.kick_fd, ring.irq_fd = kick, irqfd
            position = queue.position()
            ring.last_avail, ring.next_used = position["last_avail_idx"], position["next_used"]
            signalled = position["signalled_used"]
            ring.signalled_valid = int(signalled is not None)
            ring.signalled_used = signalled or 0
            ring.pending_signal = 0
        q.held_count = 0

    def store(self, queues: tuple[Virtqueue, Virtqueue]) -> None:
        """Give the positions back to the queues; receive chains the device held are returned to
        the available ring (the position steps back over them), so a snapshot loses none."""
        q = self._q
        for ring, queue in zip((q.rx, q.tx), queues, strict=True):
            held = q.held_count if ring is q.rx else 0
            queue.restore_position({"last_avail_idx": (ring.last_avail - held) & 0xFFFF, "next_used": ring.next_used,
                                    "signalled_used": ring.signalled_used if ring.signalled_valid else None,
                                    "notify": True})

    def forget_pending(self) -> None:
        """Drop a frame that waits for receive buffers (a reset: the driver starts over)."""
        self._q.pending_len = 0
        self._q.held_count = 0

    def run(self) -> NetRun:
        """Serve until stopped, an interrupt to send, or an error (the GIL is released meanwhile)."""
        return NetRun(_lib.netq_run(self._q))

    def process(self) -> NetRun:
        """Serve what can be served now, without waiting."""
        return NetRun(_lib.netq_process(self._q))

    def stop(self) -> None:
        """Make :meth:`run` return (from any thread, then write the wake eventfd); it keeps
        returning until :meth:`allow`."""
        self._q.stop = 1

    def allow(self) -> None:
        self._q.stop = 0

    @property
    def signalled(self) -> list[int]:
        """The queue indices (0 RX, 1 TX) of the last :attr:`NetRun.SIGNAL`."""
        return [index for index in (0, 1) if self._q.signal & (1 << index)]

    @property
    def error(self) -> tuple[int, int, str]:
        """``(ErrorKind value, queue index, message)`` of the last :attr:`NetRun.BROKEN`."""
        q = self._q
        return int(q.error_kind), int(q.error_queue), _ffi.string(q.message).decode(errors="replace")

    @property
    def last_errno(self) -> int:
        return int(self._q.last_errno)

    def counters(self) -> dict[str, int]:
        values = _ffi.unpack(self._q.counters, len(NET_COUNTERS))
        return dict(zip(NET_COUNTERS, values, strict=True))

    def close(self) -> None:
        _lib.netq_release(self._q)
