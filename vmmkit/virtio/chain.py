"""Descriptor chains of split virtqueues: what a walk yields, the Python reference walker and
the checked bindings of the native (C) walker.

Three layers, as in pynacl: ``vmmkit.virtio._native`` (private ``ffi``/``lib``, built from
``vmmkit/virtio/native/vq_walk.c`` by cffi), this module (builds the region table, checks
arguments and return codes, raises :class:`VirtqueueError`), and
:class:`vmmkit.virtio.queue.Virtqueue`, which never touches ``ffi``. :func:`walk_python` is the
reference: the two walkers must agree exactly, segment for segment and error for error, and a
hypothesis test (``tests/unit/virtio/test_walker_differential.py``) checks that they do on
hostile descriptor tables. ``VMMKIT_VIRTIO_NATIVE=0`` in the environment forces the Python
walker.

What a walk checks (every value read from the guest is hostile), in this order, per descriptor:

* the queue size is a power of two <= 32768 and the descriptor table lies inside one guest
  memory region (``RING``); the head is < the queue size (``INDEX``);
* no more descriptors than the table holds are visited, so a loop ends (``LOOP``);
* ``VIRTQ_DESC_F_INDIRECT``: only if negotiated, never inside an indirect table, never with
  ``NEXT``, a length that is a non-zero multiple of 16 and at most 65535 entries, the table
  inside one region (``INDIRECT``); it ends the direct part of the chain and the walk goes on
  at entry 0 of the table; its own ``WRITE`` flag is ignored, as the spec says;
* a device-readable buffer never follows a device-writable one (``ORDER``);
* the lengths add up to at most 2^32 bytes (``TOO_LARGE``);
* each buffer lies in guest RAM, and a writable one in writable RAM (``ADDRESS``); a buffer
  that spans adjacent regions becomes one segment per region (:meth:`GuestMemory.split`'s
  rule); zero-length buffers are checked for order but yield no segment;
* at most ``capacity`` segments (``TOO_MANY``; the queue's ``max_segments``, 1024 by default,
  Linux's ``IOV_MAX``);
* a ``next`` index is < the table's length (``INDEX``).

The native iovec API (for a device's C data path)
--------------------------------------------------
A chain walked by the native walker carries its scatter-gather list as a C array, so a
device's own C code (a virtio-blk ``preadv``/``pwritev`` path) can take it without a copy::

    chain = queue.pop()
    iov = chain.iovecs          # IovecArray
    iov.address                 # int: struct iovec *, iov.count entries
    iov.readable                # iov[0 .. readable) device-readable, iov[readable .. count)
                                # device-writable (the spec puts readable buffers first)
    iov.gpa_address             # int: uint64_t *, the guest-physical address of each entry
    iov.readable_bytes, iov.writable_bytes

    # in the device's own cffi module:
    my_lib.blk_submit(my_ffi.cast("struct iovec *", iov.address), iov.count, iov.readable)

Every ``iov_base`` points into guest RAM (checked in C before it was written there), and every
entry lies inside one guest memory region. The pointers are valid while the guest memory is
mapped (until ``GuestMemory.close()``); keep the :class:`IovecArray` (or the chain) alive while
C code uses the arrays. A chain walked in Python gets the same layout, built with ctypes.

C code that walks chains itself can compile ``vmmkit/virtio/native/vq_walk.c`` into its own
module and call ``vq_walk_chain()`` (``vq_walk.h`` documents it) with a region table of its
own.
"""

from __future__ import annotations

import bisect
import enum
import importlib
import os
import struct
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from vmmkit.errors import DeviceError, GuestMemoryError

if TYPE_CHECKING:
    from vmmkit.memory import GuestMemory

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4

#: The largest split-queue size the spec allows.
MAX_QUEUE_SIZE: Final = 32768
#: The most entries one indirect table may have (rust-vmm's bound).
MAX_INDIRECT_ENTRIES: Final = 65535
#: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total."
MAX_CHAIN_BYTES: Final = 1 << 32
#: Segments a chain may have unless the queue says otherwise (Linux's IOV_MAX, QEMU's bound).
DEFAULT_MAX_SEGMENTS: Final = 1024

_DESC = struct.Struct("<QIHH")
_U64_LIMIT: Final = 1 << 64


class ErrorKind(enum.IntEnum):
    """Why a queue operation failed. Values 1-8 are the C walker's ``VQ_ERR_*`` codes."""

    INDEX = 1  #: a head or next index beyond the queue or indirect table
    LOOP = 2  #: more descriptors than the table holds: a loop
    ADDRESS = 3  #: a buffer outside guest RAM (or a writable one in read-only memory)
    ORDER = 4  #: a device-readable buffer after a device-writable one
    INDIRECT = 5  #: indirect-table misuse
    TOO_LARGE = 6  #: a chain longer than 2^32 bytes
    TOO_MANY = 7  #: more segments than the queue's ``max_segments``
    RING = 8  #: bad queue size or ring placement
    AVAIL_INDEX = 16  #: the driver moved the available index by more than the queue size
    DEVICE = 17  #: the device misused the queue (a head it never popped)


class VirtqueueError(DeviceError):
    """The guest broke the virtqueue protocol: the device should ``mark_broken()``."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        self.kind = kind
        super().__init__(f"{message} ({kind.name.lower()})")


class Segment(NamedTuple):
    """One guest buffer of a chain, inside one guest memory region."""

    gpa: int
    length: int
    writable: bool  #: device-writable (``VIRTQ_DESC_F_WRITE``)


class IovecArray:
    """A chain's scatter-gather list as C arrays: ``struct iovec[count]`` at :attr:`address`
    and ``uint64_t[count]`` guest-physical addresses at :attr:`gpa_address`.

    ``iov[0:readable]`` are device-readable, ``iov[readable:count]`` device-writable. The
    object owns the arrays: keep it alive while C code uses them."""

    __slots__ = ("count", "readable", "readable_bytes", "writable_bytes", "_iov", "_gpa", "_keep")

    def __init__(self, iov: Any, gpa: Any, count: int, readable: int, readable_bytes: int,
                 writable_bytes: int, keep: object) -> None:
        self.count = count
        self.readable = readable
        self.readable_bytes = readable_bytes
        self.writable_bytes = writable_bytes
        self._iov = iov  # an address, or a cffi pointer (turned into one on first use)
        self._gpa = gpa
        self._keep = keep

    @property
    def address(self) -> int:
        """The address of the ``struct iovec`` array."""
        if not isinstance(self._iov, int):
            self._iov = int(_ffi.cast("uintptr_t", self._iov))
        return self._iov

    @property
    def gpa_address(self) -> int:
        """The address of the ``uint64_t`` array of guest-physical addresses."""
        if not isinstance(self._gpa, int):
            self._gpa = int(_ffi.cast("uintptr_t", self._gpa))
        return self._gpa

    def __repr__(self) -> str:
        return f"IovecArray(count={self.count}, readable={self.readable}, address={self.address:#x})"


class DescriptorChain:
    """One available buffer: the head index (what :meth:`Virtqueue.add_used` takes back) and
    its validated segments, device-readable ones first."""

    __slots__ = ("head", "segments", "readable_count", "descriptors", "memory", "_hosts", "_iovecs")

    def __init__(
        self,
        head: int,
        segments: tuple[Segment, ...],
        readable_count: int,
        descriptors: int,
        hosts: tuple[int, ...] = (),
        iovecs: IovecArray | None = None,
        memory: GuestMemory | None = None,
    ) -> None:
        self.head = head
        self.segments = segments
        self.readable_count = readable_count
        self.descriptors = descriptors
        self.memory = memory
        self._hosts = hosts
        self._iovecs = iovecs

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable_bytes}B, "
                f"writable={self.writable_bytes}B, segments={len(self.segments)})")

    @property
    def readable(self) -> tuple[Segment, ...]:
        return self.segments[: self.readable_count]

    @property
    def writable(self) -> tuple[Segment, ...]:
        return self.segments[self.readable_count :]

    @property
    def readable_bytes(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(s.length for s in self.writable)

    @property
    def host_addresses(self) -> tuple[int, ...]:
        """The host virtual address of each segment (for native code)."""
        return self._hosts

    @property
    def iovecs(self) -> IovecArray:
        """The segments as ``struct iovec[]`` for a C data path (see the module docstring)."""
        if self._iovecs is None:
            self._iovecs = _ctypes_iovecs(self)
        return self._iovecs

    def read(self, limit: int | None = None) -> bytes:
        """The device-readable bytes, concatenated (at most ``limit``)."""
        memory = self._memory()
        out = bytearray()
        for segment in self.readable:
            want = segment.length if limit is None else min(segment.length, limit - len(out))
            if want <= 0:
                break
            out += _guest(memory.read, segment.gpa, want)
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Fill the device-writable buffers in order with ``data``; the bytes written."""
        memory = self._memory()
        view = memoryview(data).cast("B")
        done = 0
        for segment in self.writable:
            if done >= len(view):
                break
            piece = view[done : done + segment.length]
            _guest(memory.write, segment.gpa, piece)
            done += len(piece)
        return done

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise VirtqueueError(ErrorKind.DEVICE, "chain has no guest memory attached")
        return self.memory


def _guest(access: Any, gpa: int, arg: Any) -> Any:
    try:
        return access(gpa, arg)
    except GuestMemoryError as exc:  # guest memory was unmapped under the chain
        raise VirtqueueError(ErrorKind.ADDRESS, str(exc)) from None


# -- the region table both walkers read -------------------------------------------------------


class _Region(NamedTuple):
    start: int
    size: int
    host: int
    buffer: Any
    readonly: bool


class RegionTable:
    """A snapshot of a :class:`GuestMemory`'s region table, for both walkers.

    Rebuild it (:meth:`is_current` says when) if regions are added or removed."""

    def __init__(self, memory: GuestMemory) -> None:
        self.source = memory.regions
        self.regions = [_Region(r.start, r.size, r.host_address, r.buffer, r.readonly) for r in self.source]
        self._starts = [r.start for r in self.regions]
        self._native: Any = None
        self._native_keep: Any = None

    def is_current(self, memory: GuestMemory) -> bool:
        return memory.regions == self.source

    def find(self, gpa: int) -> _Region | None:
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0:
            region = self.regions[index]
            if gpa - region.start < region.size:
                return region
        return None

    def translate(self, gpa: int, length: int) -> tuple[_Region, int] | None:
        """The region holding all of ``[gpa, gpa + length)`` and the offset in it, or None."""
        region = self.find(gpa)
        if region is None:
            return None
        offset = gpa - region.start
        if length < 0 or length > region.size - offset:
            return None
        return region, offset

    def native(self) -> Any:
        """The ``struct vq_memory *`` for the C walker (built once)."""
        if self._native is None:
            assert _ffi is not None
            array = _ffi.new("struct vq_region[]", len(self.regions))
            for slot, region in enumerate(self.regions):
                array[slot].gpa = region.start
                array[slot].size = region.size
                array[slot].host = _ffi.cast("uint8_t *", region.host)
                array[slot].readonly = int(region.readonly)
            mem = _ffi.new("struct vq_memory *")
            mem.regions = array
            mem.count = len(self.regions)
            self._native_keep = array
            self._native = mem
        return self._native


# -- the reference walker ---------------------------------------------------------------------


def _fail(kind: ErrorKind, message: str) -> VirtqueueError:
    return VirtqueueError(kind, message)


def _check_queue(table: RegionTable, desc_gpa: int, queue_size: int) -> tuple[_Region, int]:
    if queue_size <= 0 or queue_size > MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise _fail(ErrorKind.RING, f"queue size {queue_size} is not a power of two <= {MAX_QUEUE_SIZE}")
    found = table.translate(desc_gpa, 16 * queue_size)
    if found is None:
        raise _fail(ErrorKind.RING,
                    f"descriptor table {desc_gpa:#x}+{16 * queue_size:#x} is not in guest RAM")
    return found


def walk_python(
    table: RegionTable,
    desc_gpa: int,
    queue_size: int,
    head: int,
    *,
    indirect: bool,
    capacity: int = DEFAULT_MAX_SEGMENTS,
) -> DescriptorChain:
    """Walk the chain at ``head``: the reference implementation of ``vq_walk_chain()``."""
    region, base = _check_queue(table, desc_gpa, queue_size)
    if head < 0 or head >= queue_size:
        raise _fail(ErrorKind.INDEX, f"head {head} is beyond the queue size {queue_size}")
    buffer = region.buffer
    table_len = queue_size
    index = head
    visited = 0
    in_indirect = False
    writable_seen = False
    total = 0
    descriptors = 0
    segments: list[Segment] = []
    hosts: list[int] = []
    readable = 0
    while True:
        visited += 1
        if visited > table_len:
            raise _fail(ErrorKind.LOOP, f"chain at head {head} is longer than its table ({table_len})")
        addr, length, flags, next_index = _DESC.unpack_from(buffer, base + 16 * index)
        descriptors += 1

        if flags & VIRTQ_DESC_F_INDIRECT:
            if in_indirect:
                raise _fail(ErrorKind.INDIRECT, f"nested indirect table in chain {head}")
            if not indirect:
                raise _fail(ErrorKind.INDIRECT, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            if flags & VIRTQ_DESC_F_NEXT:
                raise _fail(ErrorKind.INDIRECT, "indirect descriptor with VIRTQ_DESC_F_NEXT")
            if length == 0 or length % 16 or length // 16 > MAX_INDIRECT_ENTRIES:
                raise _fail(ErrorKind.INDIRECT, f"indirect table length {length:#x} is invalid")
            found = table.translate(addr, length)
            if found is None:
                raise _fail(ErrorKind.INDIRECT, f"indirect table {addr:#x}+{length:#x} is not in guest RAM")
            region, base = found
            buffer = region.buffer
            table_len = length // 16
            index = 0
            visited = 0
            in_indirect = True
            continue

        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if not writable and writable_seen:
            raise _fail(ErrorKind.ORDER, f"readable buffer after a writable one in chain {head}")
        writable_seen = writable_seen or writable
        total += length
        if total > MAX_CHAIN_BYTES:
            raise _fail(ErrorKind.TOO_LARGE, f"chain {head} is longer than 4 GiB")
        gpa, left = addr, length
        while left > 0:
            found_region = table.find(gpa)
            if found_region is None or (writable and found_region.readonly):
                raise _fail(ErrorKind.ADDRESS, f"buffer {addr:#x}+{length:#x} is not in guest RAM")
            offset = gpa - found_region.start
            piece = min(found_region.size - offset, left)
            if len(segments) >= capacity:
                raise _fail(ErrorKind.TOO_MANY, f"chain {head} has more than {capacity} segments")
            segments.append(Segment(gpa, piece, writable))
            hosts.append(found_region.host + offset)
            if not writable:
                readable += 1
            gpa += piece
            left -= piece

        if not flags & VIRTQ_DESC_F_NEXT:
            return DescriptorChain(head, tuple(segments), readable, descriptors, tuple(hosts))
        index = next_index
        if index >= table_len:
            raise _fail(ErrorKind.INDEX, f"next index {index} is beyond the table ({table_len})")


# -- the native walker ------------------------------------------------------------------------

_ffi: Any = None
_lib: Any = None
_loaded = False
_IOVEC_IS_TWO_U64 = False
#: Why the native walker is not used ("" when it is); settled by :func:`native_available`.
NATIVE_UNAVAILABLE_REASON = ""


_load_lock = threading.Lock()


def _load_native() -> None:
    """Load the C module, on first use (``import vmmkit`` loads no native module). Threads
    that race here all see the outcome: ``_loaded`` is set last, under the lock."""
    global _loaded
    with _load_lock:
        if not _loaded:
            _try_native()
            _loaded = True


def _try_native() -> None:
    global _ffi, _lib, _IOVEC_IS_TWO_U64, NATIVE_UNAVAILABLE_REASON
    if os.environ.get("VMMKIT_VIRTIO_NATIVE", "1") == "0":
        NATIVE_UNAVAILABLE_REASON = "disabled by VMMKIT_VIRTIO_NATIVE=0"
        return
    try:
        native = importlib.import_module("vmmkit.virtio._native")
    except ImportError as exc:
        NATIVE_UNAVAILABLE_REASON = f"vmmkit.virtio._native is not built ({exc})"
        return
    ffi, lib = native.ffi, native.lib
    mismatched = [k.name for k in ErrorKind if k < 16 and getattr(lib, f"VQ_ERR_{k.name}") != k.value]
    if mismatched or lib.VQ_MAX_INDIRECT != MAX_INDIRECT_ENTRIES or lib.VQ_MAX_QUEUE_SIZE != MAX_QUEUE_SIZE:
        NATIVE_UNAVAILABLE_REASON = f"vmmkit.virtio._native disagrees with chain.py ({mismatched})"
        return
    _IOVEC_IS_TWO_U64 = ffi.sizeof("struct iovec") == 16 and sys.byteorder == "little"
    _ffi, _lib = ffi, lib


def native_available() -> bool:
    if not _loaded:
        _load_native()
    return _lib is not None


def native_unavailable_reason() -> str:
    """Why the native walker is not used ("" when it is)."""
    native_available()
    return NATIVE_UNAVAILABLE_REASON


class NativeScratch:
    """Reusable output arrays for :func:`walk_native` (one per queue; not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        if not native_available():
            raise RuntimeError(f"the native walker is unavailable: {NATIVE_UNAVAILABLE_REASON}")
        self.capacity = capacity
        self.iov = _ffi.new("struct iovec[]", max(capacity, 1))
        self.gpa = _ffi.new("uint64_t[]", max(capacity, 1))
        self.out = _ffi.new("struct vq_chain *")


def walk_native(
    table: RegionTable,
    desc_gpa: int,
    queue_size: int,
    head: int,
    *,
    indirect: bool,
    capacity: int = DEFAULT_MAX_SEGMENTS,
    scratch: NativeScratch | None = None,
) -> DescriptorChain:
    """Walk the chain at ``head`` in C; same result as :func:`walk_python`."""
    if _lib is None and not native_available():
        raise RuntimeError(f"the native walker is unavailable: {NATIVE_UNAVAILABLE_REASON}")
    if queue_size <= 0 or queue_size > MAX_QUEUE_SIZE or not 0 <= desc_gpa < _U64_LIMIT:
        _check_queue(table, desc_gpa, queue_size)  # raises RING, as the reference does
    if scratch is None or scratch.capacity < capacity:
        scratch = NativeScratch(capacity)
    head_arg = head if 0 <= head <= 0xFFFFFFFF else 0xFFFFFFFF  # >= queue_size either way
    flags = _lib.VQ_WALK_INDIRECT if indirect else 0
    out = scratch.out
    rc = _lib.vq_walk_chain(table.native(), desc_gpa, queue_size, head_arg, flags,
                            scratch.iov, scratch.gpa, capacity, out)
    if rc != 0:
        kind = ErrorKind(rc)
        raise _fail(kind, f"chain at head {head}: {_NATIVE_MESSAGES[kind]}")
    count, readable = out.count, out.readable
    lengths: Sequence[int]
    if _IOVEC_IS_TWO_U64:
        # One array per chain: struct iovec[count] (two words each), then uint64_t gpa[count].
        arrays = _ffi.new("uint64_t[]", 3 * count or 1)
        _ffi.memmove(arrays, scratch.iov, 16 * count)
        _ffi.memmove(arrays + 2 * count, scratch.gpa, 8 * count)
        words = _ffi.unpack(arrays, 3 * count)
        hosts = tuple(words[0 : 2 * count : 2])
        lengths = words[1 : 2 * count : 2]
        gpas = words[2 * count :]
        iov, gpa_array, keep = arrays, arrays + 2 * count, arrays
    else:  # pragma: no cover - 32-bit or big-endian hosts
        iov = _ffi.new("struct iovec[]", count or 1)
        gpa_array = _ffi.new("uint64_t[]", count or 1)
        _ffi.memmove(iov, scratch.iov, count * _ffi.sizeof("struct iovec"))
        _ffi.memmove(gpa_array, scratch.gpa, count * 8)
        gpas = _ffi.unpack(gpa_array, count)
        hosts = tuple(int(_ffi.cast("uintptr_t", iov[i].iov_base)) for i in range(count))
        lengths = [iov[i].iov_len for i in range(count)]
        keep = (iov, gpa_array)
    segments = tuple(map(Segment, gpas, lengths, [False] * readable + [True] * (count - readable)))
    iovecs = IovecArray(iov, gpa_array, count, readable, out.readable_bytes, out.writable_bytes, keep)
    return DescriptorChain(head, segments, readable, out.descriptors, hosts, iovecs)


_NATIVE_MESSAGES = {
    ErrorKind.INDEX: "a head or next index is beyond its table",
    ErrorKind.LOOP: "the chain is longer than its table (a loop)",
    ErrorKind.ADDRESS: "a buffer is not in guest RAM",
    ErrorKind.ORDER: "a readable buffer follows a writable one",
    ErrorKind.INDIRECT: "invalid indirect descriptor",
    ErrorKind.TOO_LARGE: "the chain is longer than 4 GiB",
    ErrorKind.TOO_MANY: "the chain has too many segments",
    ErrorKind.RING: "bad queue size or descriptor table placement",
}


def _ctypes_iovecs(chain: DescriptorChain) -> IovecArray:
    import ctypes  # only for chains walked in Python: ctypes costs milliseconds to import

    count = len(chain.segments)
    iov = (ctypes.c_uint64 * max(2 * count, 2))()
    gpas = (ctypes.c_uint64 * max(count, 1))()
    for i, (segment, host) in enumerate(zip(chain.segments, chain.host_addresses, strict=True)):
        iov[2 * i] = host
        iov[2 * i + 1] = segment.length
        gpas[i] = segment.gpa
    return IovecArray(ctypes.addressof(iov), ctypes.addressof(gpas), count, chain.readable_count,
                      chain.readable_bytes, chain.writable_bytes, (iov, gpas))


# -- walking with whichever is available ------------------------------------------------------


class ChainWalker:
    """Walks chains of one queue with the native walker when it is built, else in Python."""

    def __init__(self, table: RegionTable, capacity: int = DEFAULT_MAX_SEGMENTS,
                 native: bool | None = None) -> None:
        if native and not native_available():
            raise RuntimeError(f"the native walker is unavailable: {NATIVE_UNAVAILABLE_REASON}")
        self.table = table
        self.capacity = capacity
        self.native = native_available() if native is None else native
        self._scratch = NativeScratch(capacity) if self.native else None

    def walk(self, desc_gpa: int, queue_size: int, head: int, *, indirect: bool) -> DescriptorChain:
        if self.native:
            return walk_native(self.table, desc_gpa, queue_size, head, indirect=indirect,
                               capacity=self.capacity, scratch=self._scratch)
        return walk_python(self.table, desc_gpa, queue_size, head, indirect=indirect, capacity=self.capacity)


_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier between ring accesses (the C ``__atomic_thread_fence``; without
    the native module, a lock round trip, which orders at least as much on x86-64)."""
    if not _loaded:
        _load_native()
    if _lib is not None:
        _lib.vq_fence()
    else:
        with _fence_lock:
            pass


__all__: Sequence[str] = [
    "DEFAULT_MAX_SEGMENTS", "MAX_CHAIN_BYTES", "MAX_INDIRECT_ENTRIES", "MAX_QUEUE_SIZE",
    "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "ChainWalker",
    "DescriptorChain", "ErrorKind", "IovecArray", "RegionTable", "Segment", "VirtqueueError",
    "fence", "native_available", "native_unavailable_reason", "walk_native", "walk_python",
]
