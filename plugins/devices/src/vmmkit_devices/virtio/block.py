"""virtio-blk (virtio 1.2, section 5.2) over a raw or qcow2 image file: device type ``virtio-blk``, one
device per ``VmConfig.disks`` entry (vhost-user disks excepted).

Requests: ``VIRTIO_BLK_T_IN`` / ``OUT`` (``preadv``/``pwritev`` straight between guest memory and
the file, in C when ``vmmkit_devices.virtio._native`` is built: see :mod:`.blk_io`), ``FLUSH``
(``fdatasync``), ``GET_ID`` (``DiskConfig.serial``, else Cloud Hypervisor's default from the
image's device and inode numbers, NUL-padded to 20 bytes), ``DISCARD`` (punch a hole) and
``WRITE_ZEROES`` (punch a hole with the unmap flag, else zero the range). Anything else answers
``VIRTIO_BLK_S_UNSUPP``.

A qcow2 image (``image_type=qcow2``, or a file starting with qcow2's magic when ``image_type`` is
not given) is served through :mod:`.qcow2` by :class:`.blk_io.Qcow2BlockIo` instead: same
requests, capacity is the image's virtual size, FLUSH is ``fsync``, DISCARD is skipped and
WRITE_ZEROES writes zeros.

Offered features: ``SEG_MAX`` (queue size - 2, at most 254), ``BLK_SIZE`` (512, or the O_DIRECT
alignment with ``direct=on``), ``FLUSH``, ``MQ`` with ``num_queues`` > 1, ``RO`` with
``readonly=on`` (the image is then opened ``O_RDONLY``), else ``WRITE_ZEROES`` and, unless
``sparse=off``, ``DISCARD``; plus ``INDIRECT_DESC`` and ``EVENT_IDX``. The configuration space
is ``struct virtio_blk_config`` up to ``write_zeroes_may_unmap``: capacity is the file's size in
512-byte sectors (a partial last sector is not shown).

What the guest sends is checked, and answered with a status where the protocol has one:

- the status byte is the last byte of the chain's device-writable part, and is written after
  everything else the request writes; a chain with no writable byte cannot be answered, so the
  device :meth:`~.common.QueueDevice.fail`\\ s (as QEMU's ``virtio_error``);
- a header shorter than 16 bytes, a data length that is not a multiple of 512, a request that
  reaches past the capacity (nothing is transferred then, so nothing is written beyond the end of
  the file), any I/O error, and a write to a read-only disk: ``VIRTIO_BLK_S_IOERR``;
- DISCARD / WRITE_ZEROES: segment data that is not a whole number of 16-byte segments, or a
  segment past the capacity or longer than ``max_*_sectors``: ``IOERR``; more than ``max_*_seg``
  segments, an unknown flag, the unmap flag on DISCARD, or a command whose feature was not
  negotiated: ``UNSUPP``. All segments are checked before any is executed.

Used length: data bytes + 1 for a successful read, the ID bytes + 1 for GET_ID, else 1.

Requests are served on one thread per queue (``<id>_q<i>``), so the VM's event loop never waits
for the disk. On a raw image with the native module built, that thread runs the whole queue in C
(``native/blk_queue.c`` through :class:`.blk_io.NativeQueue`) without the GIL: it waits on the
queue's eventfd, pops chains with the SDK's C walker, makes the checks above, serves the request,
writes the status byte and the used ring (event-idx suppression included) and signals the driver
through the transport's irqfd where it has one (``queue_irqfd``: virtio-pci with MSI-X), else it
returns to Python for that one interrupt. With ``direct=on`` it serves up to
:data:`IN_FLIGHT_DIRECT` consecutive reads and writes at once on a small pool of C threads when
they touch disjoint guest buffers and disk bytes (so the result is the sequential one).
``VMMKIT_BLK_QUEUE_NATIVE=0`` keeps the queues in Python (a qcow2 image always is). The C worker
is stopped, and its ring position handed back to the :class:`~vmmkit.virtio.queue.Virtqueue`,
before pause (snapshots), reset, re-activation, failure and close (hot-remove); no request is in
flight then. The Python path, :meth:`BlockDevice.handle`, is the reference it is tested against.

Rate limits (``--disk bw_size=,bw_one_time_burst=,bw_refill_time=,ops_size=,...``, or
``rate_limit_group=<id>`` for a :class:`~vmmkit.ratelimit.RateLimiter` shared with other disks):
a limited disk is served on the Python path (the C queue is not used), which asks the limiter
before each request: one operation, and for IN / OUT the data bytes. A refused request goes back
to the available ring (:meth:`~vmmkit.virtio.queue.Virtqueue.undo_pop`) and the queue stops
until the limiter's timer fires, which wakes every queue of every disk using the limiter; no
request is dropped. The Python path is chosen over a second bucket in C because the limiter is
one object shared by disks (groups) and threads, and a throttled disk's rate is the limit, well
below what the Python path serves (``bench/blk.py --limit``). ``rate_limited`` counts the
refusals.

Counters (Cloud Hypervisor's names first): ``read_bytes``, ``write_bytes``, ``read_ops``,
``write_ops``, ``flush_ops``, ``discard_ops``, ``write_zeroes_ops``, ``get_id_ops``,
``io_errors``, ``invalid_requests`` (answered IOERR for a malformed or out-of-range request),
``unsupported_requests``, and with ``direct=on`` ``direct_ops`` / ``direct_fallbacks``; the C
queue adds ``direct_einval`` and ``overlapped_requests`` (served at once with others) when non-zero.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.ratelimit import RateLimiter
from vmmkit.virtio.chain import DEFAULT_MAX_SEGMENTS, ErrorKind, VirtqueueError
from vmmkit.virtio.device import ActivationContext, VirtioInterruptType
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioBlockType as VirtioBlockType  # declared there, re-exported
from vmmkit_devices.virtio.blk_io import (
    SECTOR_SIZE,
    BlockIo,
    DiskImage,
    IoResult,
    IoStatus,
    NativeQueue,
    QueueRun,
    make_block_io,
    native_available,
    native_queue_available,
    queue_flags,
)
from vmmkit_devices.virtio.native_workers import NativeQueueDevice, NativeWorker

if TYPE_CHECKING:
    from vmmkit.config import DiskConfig
    from vmmkit.virtio.chain import DescriptorChain

log = get_logger()

VIRTIO_ID_BLOCK: Final = 2

VIRTIO_BLK_F_SIZE_MAX: Final = 1 << 1
VIRTIO_BLK_F_SEG_MAX: Final = 1 << 2
VIRTIO_BLK_F_RO: Final = 1 << 5
VIRTIO_BLK_F_BLK_SIZE: Final = 1 << 6
VIRTIO_BLK_F_FLUSH: Final = 1 << 9
VIRTIO_BLK_F_MQ: Final = 1 << 12
VIRTIO_BLK_F_DISCARD: Final = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 1 << 14

VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13

VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1
VIRTIO_BLK_ID_BYTES: Final = 20

#: struct virtio_blk_outhdr: type, ioprio (reserved), sector.
HEADER: Final = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
DWZ_SEGMENT: Final = struct.Struct("<QII")
#: struct virtio_blk_config up to write_zeroes_may_unmap (and its padding), 60 bytes.
CONFIG: Final = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

#: Largest DISCARD / WRITE_ZEROES range (sectors) and segment count we accept per request.
MAX_DISCARD_SECTORS: Final = 0x3F_FFFF  # just under 2 GiB
MAX_DISCARD_SEGMENTS: Final = 32
#: Signal the driver at least every this many completed requests.
SIGNAL_BATCH: Final = 32


_WRITES: Final = frozenset({VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES})


class _Malformed(Exception):
    """A request the protocol gives no way to answer: the device fails."""


class BlockDevice(NativeQueueDevice):
    """A virtio-blk device serving one :class:`~.blk_io.DiskImage`.

    :param device_id: the device's id.
    :param image: the open image (the device owns and closes it).
    :param num_queues: request queues (``VIRTIO_BLK_F_MQ`` when > 1).
    :param queue_size: each queue's maximum size.
    :param serial: the GET_ID answer (at most 20 bytes; NUL-padded).
    :param sparse: offer DISCARD and unmap on WRITE_ZEROES (Cloud Hypervisor's ``sparse``).
    :param native: use the C data path (``None``: when built).
    :param rate_limiter: limits the requests (the Python path serves them then).
    :param owns_limiter: close ``rate_limiter`` with the device (not a group's).
    """

    device_type = VIRTIO_ID_BLOCK
    name = "virtio-blk"
    own_threads = True

    def __init__(self, device_id: str, image: DiskImage, *, num_queues: int = 1, queue_size: int = 128,
                 serial: bytes | None = None, sparse: bool = True, native: bool | None = None,
                 rate_limiter: RateLimiter | None = None, owns_limiter: bool = False) -> None:
        if num_queues < 1:
            raise DeviceError(f"{device_id}: num_queues must be at least 1")
        if native and not native_available():
            raise DeviceError(f"{device_id}: the native block path is not built (pip install -e plugins/devices)")
        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        if image.readonly:
            features |= VIRTIO_BLK_F_RO
        else:
            features |= VIRTIO_BLK_F_WRITE_ZEROES
            if sparse:
                features |= VIRTIO_BLK_F_DISCARD
        super().__init__(device_id, [queue_size] * num_queues, features)
        self.image = image
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.sparse = sparse
        self.native = (native_available() if native is None else native) and image.qcow2 is None
        #: Whole queues served in C (``native/blk_queue.c``): the native path on a raw image.
        self.native_queue = self.native and native_queue_available() and rate_limiter is None
        self.rate_limiter = rate_limiter
        self._owns_limiter = owns_limiter
        self._queues: list[NativeQueue | None] = []
        #: Requests the C queue serves at once: with O_DIRECT each blocks on the device, so
        #: overlapping them pays; buffered I/O mostly copies from the page cache.
        self.in_flight = _in_flight(device_id, image.direct)
        identity = image.default_serial() if serial is None else serial
        self.serial = identity[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self._io: BlockIo | None = None
        for name in ("read_bytes", "write_bytes", "read_ops", "write_ops", "flush_ops", "discard_ops"):
            self.count(name, 0)

    @classmethod
    def from_config(cls, device_id: str, config: DiskConfig, *, native: bool | None = None,
                    group: RateLimiter | None = None) -> BlockDevice:
        """Open ``config.path`` as ``config`` says (``readonly``, ``direct``, ``lock_granularity``...).

        :param group: the limiter of ``config.rate_limit_group`` (the VM's; see :func:`create`).
        """
        if config.rate_limit_group is not None and group is None:
            raise DeviceError(f"{device_id}: rate limit group {config.rate_limit_group!r} not given")
        if config.vhost_user or config.path is None:
            raise DeviceError(f"{device_id}: a vhost-user disk is not served by virtio-blk")
        image = DiskImage(config.path, readonly=config.readonly, direct=config.direct,
                          lock=config.lock_granularity, image_type=config.image_type, owner=device_id,
                          backing_files=config.backing_files)
        limiter, owned = group, False
        try:
            serial = config.serial.encode() if config.serial is not None else None
            if config.rate_limiter_config is not None:
                limiter, owned = RateLimiter.from_config(config.rate_limiter_config, name=device_id), True
            return cls(device_id, image, num_queues=config.num_queues, queue_size=config.queue_size,
                       serial=serial, sparse=config.sparse, native=native, rate_limiter=limiter,
                       owns_limiter=owned)
        except BaseException:
            if owned and limiter is not None:
                limiter.close()
            image.close()
            raise

    # -- configuration space ----------------------------------------------------------------

    @property
    def seg_max(self) -> int:
        return max(1, min(self.queue_size - 2, 254))

    def config_space(self) -> bytes:
        may_unmap = int(self.sparse and not self.image.readonly)
        return CONFIG.pack(
            self.image.capacity, 0, self.seg_max,
            0, 0, 0,  # geometry: not offered
            self.image.block_size,
            0, 0, 0, 0,  # topology: not offered
            0, 0, self.num_queues,  # writeback, unused, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, self.image.block_size // SECTOR_SIZE,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, may_unmap,
        )

    def describe(self) -> Mapping[str, Any]:
        return {"path": self.image.path, "capacity": self.image.capacity, "readonly": self.image.readonly,
                "direct": self.image.direct, "block_size": self.image.block_size, "native": self.native,
                "native_queue": self.native_queue, "in_flight": self.in_flight if self.native_queue else 1,
                "num_queues": self.num_queues, "rate_limited": self.rate_limiter is not None}

    # -- lifecycle --------------------------------------------------------------------------

    def hand_over(self) -> None:
        """Live migration: the destination opens the same image and takes its lock."""
        self.image.unlock()

    def take_back(self) -> None:
        self.image.relock(self.id)

    def resize(self, size: int) -> None:
        """``vm.resize-disk``, as Cloud Hypervisor's ``Block::resize``: the image file takes
        ``size`` bytes (a multiple of 512), the capacity follows, and an active driver gets a
        configuration-change interrupt (virtio 1.2, 4.1.4.3 / 5.2.4), after which it re-reads
        ``capacity``."""
        self.image.resize(size)
        for native in list(self._queues):
            if native is not None:
                native.sync_disk()  # one aligned 64-bit store of the size: the C worker sees old or new
        ctx = self._ctx
        if ctx is not None and self._active:
            ctx.interrupt.trigger(VirtioInterruptType.CONFIG)

    def activated(self, ctx: ActivationContext) -> None:
        self._io = make_block_io(self.image, ctx.memory, self.native)
        if self.rate_limiter is not None:
            self.rate_limiter.subscribe(ctx.event_loop, self._refilled)
        if not self.native_queue:
            return
        wake_fd = self._open_wake()
        flags = queue_flags(flush=self.negotiated(VIRTIO_BLK_F_FLUSH), discard=self.negotiated(VIRTIO_BLK_F_DISCARD),
                            write_zeroes=self.negotiated(VIRTIO_BLK_F_WRITE_ZEROES), sparse=self.sparse)
        irqfd = getattr(ctx.interrupt, "queue_irqfd", None)
        self._queues = []
        for index, (queue, kick) in enumerate(zip(ctx.queues, ctx.queue_events, strict=True)):
            fd = irqfd(index) if callable(irqfd) else None
            self._queues.append(NativeQueue(
                self.image, ctx.memory, kick_fd=kick, wake_fd=wake_fd, irq_fd=-1 if fd is None else fd,
                serial=self.serial, flags=flags, max_segments=getattr(queue, "max_segments", DEFAULT_MAX_SEGMENTS),
                in_flight=self.in_flight))
        log.debug("virtio_blk.native_queues", device=self.id, queues=len(self._queues),
                  irqfds=[fd is not None for fd in map(irqfd, range(len(self._queues)))] if callable(irqfd) else [])

    def deactivated(self) -> None:
        self._io = None  # requests are served synchronously: nothing else is in flight
        if self.rate_limiter is not None:
            self.rate_limiter.unsubscribe(self._refilled)
        queues, self._queues = self._queues, []
        for native in queues:
            if native is not None:
                self._retire(native)

    def release(self) -> None:
        self._stop_native()
        self._close_wake()
        if self.rate_limiter is not None and self._owns_limiter:
            self.rate_limiter.close()
        self.image.close()

    def native_workers(self) -> list[NativeWorker]:
        return [native for native in self._queues if native is not None]

    def resumed(self) -> None:
        self._drain_wake()
        for native in list(self._queues):
            if native is not None:
                native.allow()

    # -- requests ---------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        native = self._queues[index] if index < len(self._queues) else None
        if native is not None:
            self._serve_native(index, queue, native)
            return
        done = 0
        limiter = self.rate_limiter
        while self.running():
            chain = queue.pop()
            if chain is None:
                break
            if limiter is not None and not limiter.consume_request(_data_bytes(chain)):
                queue.undo_pop()  # stays available; _refilled looks again
                self.count("rate_limited")
                break
            try:
                used = self.handle(chain)
            except _Malformed as exc:
                self.fail(queue, f"queue {index}: {exc}")
                return
            queue.add_used(chain.head, used)
            done += 1
            if done % SIGNAL_BATCH == 0:
                self.signal(queue)
        if done % SIGNAL_BATCH:
            self.signal(queue)

    def _refilled(self) -> None:
        """The limiter's timer fired (event loop): look at every queue again."""
        for index in range(self.num_queues):
            self.wake(index)

    def _serve_native(self, index: int, queue: Virtqueue, native: NativeQueue) -> None:
        """Run the queue in C until it is stopped (pause, reset, close) or breaks."""
        native.load(queue)
        try:
            while self.running() and queue.active:
                result = native.run()
                if result is QueueRun.SIGNAL:
                    ctx = self._ctx
                    if ctx is not None:
                        ctx.interrupt.trigger(VirtioInterruptType.QUEUE, index)
                elif result is QueueRun.BROKEN:
                    kind = native.error[0]
                    if kind in (ErrorKind.ADDRESS, ErrorKind.RING) and native.refresh_memory():
                        continue  # guest memory changed (hotplug): walk the same chain again with the new table
                    self._native_broken(index, queue, *native.error)
                    return
                else:
                    return
        finally:
            native.store(queue)

    def _native_broken(self, index: int, queue: Virtqueue, kind: int, message: str) -> None:
        """What the Python path does for the same fault: a protocol error breaks the queue with
        its kind (the transport reports it) and then the device; a request it cannot answer
        (no status byte) fails the device through the queue."""
        error_kind = ErrorKind(kind)
        if error_kind is ErrorKind.DEVICE:
            self.fail(queue, f"queue {index}: {message}")
            return
        if error_kind is ErrorKind.AVAIL_INDEX:
            message = f"queue {index}: {message}"
        queue.mark_broken(message, error_kind)
        self.fail(None, str(VirtqueueError(error_kind, message)))

    def handle(self, chain: DescriptorChain) -> int:
        """Serve one request; the used length. Raises :class:`_Malformed` if unanswerable."""
        memory = chain.memory
        assert memory is not None and self._io is not None
        status_gpa = _status_byte(chain.writable)
        if status_gpa is None:
            raise _Malformed(f"request {chain.head} has no device-writable status byte")
        if chain.readable_bytes < HEADER.size:
            self.count("invalid_requests")
            return self._complete(memory, status_gpa, VIRTIO_BLK_S_IOERR)
        kind, _ioprio, sector = HEADER.unpack(chain.read(HEADER.size))
        data_in = chain.writable_bytes - 1  # writable bytes before the status byte
        data_out = chain.readable_bytes - HEADER.size
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status = self._transfer(chain, False, sector, 0, data_in)
            written = data_in if status == VIRTIO_BLK_S_OK else 0
        elif kind == VIRTIO_BLK_T_OUT:
            status = self._transfer(chain, True, sector, HEADER.size, data_out)
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._status(self._io.flush())
            self.count("flush_ops")
        elif kind == VIRTIO_BLK_T_GET_ID:
            written = chain.write(self.serial[: min(VIRTIO_BLK_ID_BYTES, data_in)])
            status = VIRTIO_BLK_S_OK
            self.count("get_id_ops")
        elif kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            status = self._discard_or_zero(chain, kind == VIRTIO_BLK_T_DISCARD, data_out)
        else:
            status = VIRTIO_BLK_S_UNSUPP
        if status == VIRTIO_BLK_S_UNSUPP:
            self.count("unsupported_requests")
        elif status == VIRTIO_BLK_S_OK and kind in _WRITES and not self.acked_features & VIRTIO_BLK_F_FLUSH:
            # A driver without FLUSH expects write-through: stable before completion (5.2.6.2).
            status = self._status(self._io.flush())
            self.count("flush_ops")
        return written + self._complete(memory, status_gpa, status)

    def _complete(self, memory: Any, status_gpa: int, status: int) -> int:
        memory.write(status_gpa, bytes((status,)))
        return 1

    def _status(self, result: IoResult) -> int:
        if result.ok:
            return VIRTIO_BLK_S_OK
        if result.status is IoStatus.IO:
            self.count("io_errors")
            log.debug("virtio_blk.io_error", device=self.id, errno=result.error)
        else:  # refused by the data path's own checks: a guest (or SDK) error
            self.count("invalid_requests")
            log.debug("virtio_blk.refused", device=self.id, reason=result.status.name)
        return VIRTIO_BLK_S_IOERR

    def _in_disk(self, sector: int, sectors: int) -> bool:
        capacity = self.image.capacity
        return sector <= capacity and sectors <= capacity - sector

    def _transfer(self, chain: DescriptorChain, write: bool, sector: int, skip: int, length: int) -> int:
        assert self._io is not None
        if write and self.image.readonly:
            self.count("invalid_requests")
            return VIRTIO_BLK_S_IOERR
        if length % SECTOR_SIZE or not self._in_disk(sector, length // SECTOR_SIZE):
            self.count("invalid_requests")
            return VIRTIO_BLK_S_IOERR
        result = self._io.transfer(chain, write, sector * SECTOR_SIZE, skip, length)
        if result.direct:
            self.count("direct_ops")
        if result.fallback:
            self.count("direct_fallbacks")
        status = self._status(result)
        if status == VIRTIO_BLK_S_OK:
            self.count("write_ops" if write else "read_ops")
            self.count("write_bytes" if write else "read_bytes", length)
        return status

    def _discard_or_zero(self, chain: DescriptorChain, discard: bool, data: int) -> int:
        assert self._io is not None
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.negotiated(feature) or self.image.readonly:
            return VIRTIO_BLK_S_UNSUPP
        if data <= 0 or data % DWZ_SEGMENT.size:
            self.count("invalid_requests")
            return VIRTIO_BLK_S_IOERR
        if data // DWZ_SEGMENT.size > MAX_DISCARD_SEGMENTS:
            return VIRTIO_BLK_S_UNSUPP
        raw = chain.read(HEADER.size + data)[HEADER.size :]
        segments = [DWZ_SEGMENT.unpack_from(raw, at) for at in range(0, data, DWZ_SEGMENT.size)]
        for _sector, _sectors, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
        for sector, sectors, _flags in segments:
            if sectors > MAX_DISCARD_SECTORS or not self._in_disk(sector, sectors):
                self.count("invalid_requests")
                return VIRTIO_BLK_S_IOERR
        for sector, sectors, flags in segments:
            offset, length = sector * SECTOR_SIZE, sectors * SECTOR_SIZE
            if discard:
                result = self._io.discard(offset, length)
            else:
                unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) and self.sparse
                result = self._io.write_zeroes(offset, length, unmap)
            status = self._status(result)
            if status != VIRTIO_BLK_S_OK:
                return status
        self.count("discard_ops" if discard else "write_zeroes_ops")
        return VIRTIO_BLK_S_OK


#: Requests in flight per queue with ``direct=on`` (the C queue's pool has ``IN_FLIGHT_DIRECT - 1`` threads).
IN_FLIGHT_DIRECT: Final = 4


def _in_flight(device_id: str, direct: bool) -> int:
    """``VMMKIT_BLK_IN_FLIGHT`` (1-8) if set, else :data:`IN_FLIGHT_DIRECT` with O_DIRECT, else 1."""
    value = os.environ.get("VMMKIT_BLK_IN_FLIGHT")
    if value is None:
        return IN_FLIGHT_DIRECT if direct else 1
    if not value.isdigit() or not 1 <= int(value) <= 8:
        raise DeviceError(f"{device_id}: VMMKIT_BLK_IN_FLIGHT must be 1 to 8, not {value!r}")
    return int(value)


def _data_bytes(chain: DescriptorChain) -> int:
    """The bytes a request moves, for the bandwidth limit: the data of an IN or OUT, else 0
    (a malformed header costs nothing here; :meth:`BlockDevice.handle` answers it)."""
    if chain.readable_bytes < HEADER.size:
        return 0
    kind = HEADER.unpack(chain.read(HEADER.size))[0]
    if kind == VIRTIO_BLK_T_IN:
        return max(chain.writable_bytes - 1, 0)
    if kind == VIRTIO_BLK_T_OUT:
        return chain.readable_bytes - HEADER.size
    return 0


def _status_byte(writable: Sequence[Any]) -> int | None:
    """The guest-physical address of the last device-writable byte."""
    for segment in reversed(writable):
        if segment.length:
            return int(segment.gpa + segment.length - 1)
    return None


def create(ctx: DeviceContext, request: DeviceRequest) -> BlockDevice:
    """``VirtioBlockType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    config = request.config
    if config is None or not hasattr(config, "path"):
        raise DeviceError(f"{request.id}: virtio-blk needs a DiskConfig")
    group = ctx.rate_limit_group(config.rate_limit_group) if config.rate_limit_group is not None else None
    return BlockDevice.from_config(request.id, config, group=group)
