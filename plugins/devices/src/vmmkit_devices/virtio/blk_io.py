"""The virtio-blk data path: an open raw image, and two equivalent ways to serve a request's
data between guest memory and that image.

Three layers, as in pynacl: ``vmmkit_devices.virtio._native`` (private ``ffi``/``lib``, built by
cffi from ``native/blk_io.c``), this module (:class:`NativeBlockIo` builds the C region table,
calls C, maps return codes to :class:`IoResult`), and :class:`vmmkit_devices.virtio.block.BlockDevice`,
which never touches ``ffi``. :class:`PythonBlockIo` is the reference implementation: both must
give the same :class:`IoResult` status and leave the same bytes in guest memory and on disk, which
``tests/unit/devices/virtio/test_blk_differential.py`` checks with hypothesis.
``VMMKIT_BLK_NATIVE=0`` in the environment forces the Python path.

Both take a validated :class:`vmmkit.virtio.chain.DescriptorChain` and check again what they use:
the bytes to move are ``length`` bytes of the chain's readable part (``write=True``: guest ->
file) or writable part (``write=False``: file -> guest) after ``skip`` bytes; ``offset`` and
``length`` are sector (512-byte) multiples inside the disk; every piece lies in one guest memory
region, and a writable one when the device writes into the guest; at most :data:`MAX_IOV` pieces.
The native path hands the chain's ``struct iovec`` array (:attr:`DescriptorChain.iovecs`, from the
SDK's C walker or built with ctypes) straight to ``preadv``/``pwritev``; the checks are made again
in C against its own copy of the region table, so a stale or forged iovec is refused before any
system call (``IoStatus.IOVEC``): each piece's guest-physical range must lie in one region
(a writable one when the device writes into the guest), and its host address must be that
region's translation of it.

``direct=on`` (O_DIRECT). The image is opened twice, buffered and with ``O_DIRECT``. A transfer
whose file offset, length, and every guest buffer's host address and length meet the direct-I/O
alignment (``statx(STATX_DIOALIGN)``, else 512 bytes) goes through the O_DIRECT descriptor; any
other falls back to the buffered descriptor (counted in ``direct_fallbacks``). If O_DIRECT still
refuses (``EINVAL``), the transfer is redone buffered and the required alignment raised to 4 KiB.
Linux keeps the two descriptors coherent (a direct read writes back dirty cached pages of its
range first; a direct write invalidates them), and FLUSH (``fdatasync``) covers both. No bounce
buffer: guests normally send page-aligned buffers, and the device advertises the direct-I/O
offset alignment as ``blk_size`` so their requests are aligned too.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_codes
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from vmmkit.errors import DeviceError, GuestMemoryError
from vmmkit.log import get_logger
from vmmkit_devices.virtio.qcow2 import Qcow2Image, is_qcow2

if TYPE_CHECKING:
    from vmmkit.memory import GuestMemory
    from vmmkit.virtio.chain import DescriptorChain, Segment
    from vmmkit.virtio.queue import Virtqueue

log = get_logger()

SECTOR_SIZE: Final = 512
#: Pieces one transfer may have (Linux's IOV_MAX; the C array's size).
MAX_IOV: Final = 1024
#: The alignment assumed when statx() cannot tell, and the one O_DIRECT's EINVAL raises it to.
DEFAULT_DIO_ALIGN: Final = 512
FALLBACK_DIO_ALIGN: Final = 4096
_ZERO_CHUNK: Final = 64 * 1024
_ZEROS: Final = bytes(_ZERO_CHUNK)

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10



class IoStatus(enum.IntEnum):
    """What a data-path call did; values are ``blk_io.h``'s ``BLK_*``."""

    OK = 0
    RANGE = 1  #: offset/length not sector multiples, or beyond the disk
    IOVEC = 2  #: a buffer outside guest RAM (or into read-only RAM)
    TOO_MANY = 3  #: more than MAX_IOV buffers
    READONLY = 4  #: a write to a read-only disk
    ARGS = 5  #: skip + length beyond the chain's buffers
    IO = 6  #: the host refused: ``error`` is the errno


class IoResult(NamedTuple):
    status: IoStatus
    bytes: int = 0
    error: int = 0
    direct: bool = False  #: the transfer went through the O_DIRECT descriptor
    fallback: bool = False  #: direct=on, but the buffered descriptor was used
    einval: bool = False  #: O_DIRECT refused the alignment (it has been raised)
    emulated: bool = False  #: discard skipped / write-zeroes written as zeros

    @property
    def ok(self) -> bool:
        return self.status is IoStatus.OK


# -- the image ---------------------------------------------------------------------------------


# The C library already loaded (dlopen(NULL)): ctypes.util.find_library forks ldconfig, which the
# seccomp filter of the API thread that imports this module for a hot-added disk forbids.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_STATX_DIOALIGN: Final = 0x2000
_AT_EMPTY_PATH: Final = 0x1000
_STATX_SIZE: Final = 256
_STATX_DIO_OFFSET: Final = 152  # struct statx: stx_dio_mem_align, then stx_dio_offset_align


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """``(memory, offset)`` alignment O_DIRECT needs on ``fd``, from ``statx(STATX_DIOALIGN)``;
    ``None`` where the kernel or file system does not say."""
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buffer) != 0:
        return None
    mask = struct.unpack_from("<I", buffer.raw, 0)[0]
    mem_align, offset_align = struct.unpack_from("<II", buffer.raw, _STATX_DIO_OFFSET)
    if not mask & _STATX_DIOALIGN or not mem_align or not offset_align:
        return None
    return mem_align, offset_align


def _flock(kind: int, length: int) -> bytes:
    # struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    return struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, 0, length, 0)


class DiskImage:
    """A raw disk image, open for the device's whole life.

    :param path: the image file (or block device).
    :param readonly: open it ``O_RDONLY`` (the device then offers ``VIRTIO_BLK_F_RO``).
    :param direct: also open it ``O_DIRECT`` (see the module docstring).
    :param lock: ``"ByteRange"`` (lock the image's bytes) or ``"Full"`` (the whole file, to EOF
        and beyond), as Cloud Hypervisor's ``lock_granularity``: an open-file-description lock,
        shared for read-only use, exclusive otherwise, so two VMs never write one image.
    :param image_type: ``"Raw"``, ``"Qcow2"`` (see :mod:`.qcow2`) or ``"Unknown"``: as Cloud
        Hypervisor, a file starting with qcow2's magic is then qcow2, any other raw.
    :param backing_files: a qcow2 image may have a backing file (Cloud Hypervisor's ``backing_files``).
    :raises DeviceError: the file is missing, unreadable, locked, of an unsupported format, or
        O_DIRECT is not possible on it; the message names the path.
    """

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = False,
                 lock: str = "ByteRange", image_type: str = "Unknown", owner: str = "disk",
                 backing_files: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.fd = -1
        self.direct_fd = -1
        self.mem_align = DEFAULT_DIO_ALIGN
        self.offset_align = DEFAULT_DIO_ALIGN
        self.lock_granularity = lock
        self.backing_files = backing_files
        #: The qcow2 layer when the image is qcow2 (requests then go through it, not the raw path).
        self.qcow2: Qcow2Image | None = None
        if image_type not in ("Raw", "Qcow2", "Unknown"):
            raise DeviceError(f"{owner}: {path}: image_type {image_type} is not supported (raw and qcow2 only)")
        # O_NONBLOCK: a FIFO (refused in _setup) must not block the open waiting for a writer.
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self.fd = os.open(path, flags)
            os.set_blocking(self.fd, True)
        except FileNotFoundError:
            raise DeviceError(f"{owner}: disk image {path} does not exist") from None
        except ValueError:  # os.open's "embedded null byte"
            raise DeviceError(f"{owner}: disk image path {path!r} contains a NUL character") from None
        except OSError as exc:
            raise DeviceError(f"{owner}: cannot open disk image {path}: {exc.strerror or exc}") from None
        try:
            self._setup(owner, lock, image_type)
        except BaseException:
            self.close()
            raise

    def _setup(self, owner: str, lock: str, image_type: str) -> None:
        path = self.path
        info = os.fstat(self.fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise DeviceError(f"{owner}: disk image {path} is not a regular file or block device")
        self.stat = info
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if image_type == "Qcow2" or (image_type == "Unknown" and is_qcow2(self.fd)):
            if self.direct:
                raise DeviceError(f"{owner}: disk image {path} is qcow2; direct=on is supported for raw images only")
            if not stat.S_ISREG(info.st_mode):
                raise DeviceError(f"{owner}: a qcow2 disk image must be a regular file: {path}")
            self._lock(owner, lock, size)
            try:
                self.qcow2 = Qcow2Image(self.fd, path, readonly=self.readonly, allow_backing=self.backing_files)
            except OSError as exc:
                raise DeviceError(f"{owner}: cannot read qcow2 image {path}: {exc.strerror or exc}") from None
            except DeviceError as exc:
                raise DeviceError(f"{owner}: {exc}") from None
            self.size = self.qcow2.size
            return
        if size % SECTOR_SIZE:
            log.warning("virtio_blk.size_not_sector_multiple", device=owner, path=path, size=size)
        #: Bytes the guest sees: the file's size rounded down to whole sectors.
        self.size = size - size % SECTOR_SIZE
        self._lock(owner, lock, size)
        if self.direct:
            try:
                self.direct_fd = os.open(path, (os.O_RDONLY if self.readonly else os.O_RDWR)
                                         | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as exc:
                raise DeviceError(f"{owner}: direct=on, but {path} cannot be opened with O_DIRECT: "
                                  f"{exc.strerror or exc}") from None
            alignment = dio_alignment(self.direct_fd)
            if alignment is not None:
                self.mem_align, self.offset_align = alignment

    def _lock(self, owner: str, lock: str, size: int) -> None:
        kind = fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(kind, 0 if lock == "Full" else max(size, 1)))
        except OSError as exc:
            if exc.errno in (errno_codes.EAGAIN, errno_codes.EACCES):
                raise DeviceError(f"{owner}: disk image {self.path} is locked by another user "
                                  "(is another VM using it?)") from None
            log.warning("virtio_blk.lock_unsupported", device=owner, path=self.path, error=exc.strerror)

    def unlock(self) -> None:
        """Drop the image's lock (live migration hands the image to another process)."""
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, 0))
        except OSError as exc:
            log.warning("virtio_blk.unlock_failed", path=self.path, error=exc.strerror)

    def relock(self, owner: str) -> None:
        """Take the lock :meth:`unlock` dropped again.

        :raises DeviceError: another process holds it now."""
        self._lock(owner, self.lock_granularity, os.fstat(self.fd).st_size)

    def resize(self, size: int) -> None:
        """Make the image file ``size`` bytes (``ftruncate``: growing adds zeros) and show the
        guest that many.

        :raises DeviceError: not a positive multiple of 512, a read-only disk, or a block device.
        """
        if size <= 0 or size % SECTOR_SIZE:
            raise DeviceError(f"{self.path}: a disk's size must be a positive multiple of {SECTOR_SIZE} bytes, "
                              f"not {size}")
        if self.readonly:
            raise DeviceError(f"{self.path}: the disk is read-only and cannot be resized")
        if not stat.S_ISREG(self.stat.st_mode):
            raise DeviceError(f"{self.path}: only a disk image file can be resized, not a block device")
        if self.qcow2 is not None:
            raise DeviceError(f"{self.path}: resizing a qcow2 image is not supported")
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise DeviceError(f"{self.path}: cannot resize the image to {size} bytes: {exc.strerror or exc}") from None
        if self.lock_granularity != "Full":
            try:  # the byte-range lock covers the image's bytes: now these
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, size))
            except OSError as exc:
                log.warning("virtio_blk.relock_failed", path=self.path, error=exc.strerror)
        self.size = size

    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors."""
        return self.size // SECTOR_SIZE

    @property
    def block_size(self) -> int:
        """The logical block size to advertise: 512, or O_DIRECT's offset alignment."""
        return max(SECTOR_SIZE, self.offset_align) if self.direct else SECTOR_SIZE

    def default_serial(self) -> bytes:
        """Cloud Hypervisor's default GET_ID answer: device, rdev and inode numbers, 20 bytes."""
        info = self.stat
        return f"{info.st_dev}{info.st_rdev}{info.st_ino}".encode()[:20]

    def raise_alignment(self) -> None:
        """O_DIRECT refused a transfer we thought aligned: be more careful from now on."""
        self.mem_align = max(self.mem_align, FALLBACK_DIO_ALIGN)
        self.offset_align = max(self.offset_align, FALLBACK_DIO_ALIGN)

    def close(self) -> None:
        if self.qcow2 is not None:
            self.qcow2.close()
            self.qcow2 = None
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)  # the OFD lock goes with the last descriptor
                except OSError:
                    pass


# -- the reference (Python) path ----------------------------------------------------------------


class _Piece(NamedTuple):
    gpa: int
    length: int
    host: int


def _slice(segments: Sequence[Segment], hosts: Sequence[int], skip: int, length: int) -> list[_Piece] | IoStatus:
    """``length`` bytes of ``segments`` after ``skip`` bytes, as pieces (empty ones dropped)."""
    if len(segments) > MAX_IOV:
        return IoStatus.TOO_MANY
    total = sum(s.length for s in segments)
    if skip < 0 or length < 0 or length > total or skip > total - length:
        return IoStatus.ARGS
    pieces = []
    for segment, host in zip(segments, hosts, strict=True):
        if not length:
            break
        if skip >= segment.length:
            skip -= segment.length
            continue
        piece = min(segment.length - skip, length)
        pieces.append(_Piece(segment.gpa + skip, piece, host + skip))
        length -= piece
        skip = 0
    return pieces


def _range_ok(image: DiskImage, offset: int, length: int) -> bool:
    if offset % SECTOR_SIZE or length % SECTOR_SIZE or offset < 0 or length < 0:
        return False
    return offset <= image.size and length <= image.size - offset


def _oserror(exc: OSError) -> int:
    return exc.errno or errno_codes.EIO


class PythonBlockIo:
    """The reference data path: ``os.preadv``/``os.pwritev`` on views of guest memory."""

    native: Final = False

    def __init__(self, image: DiskImage, memory: GuestMemory) -> None:
        self.image = image
        self.memory = memory

    def transfer(self, chain: DescriptorChain, write: bool, offset: int, skip: int, length: int) -> IoResult:
        image = self.image
        gathered = self._guest_buffers(chain, write, offset, skip, length)
        if isinstance(gathered, IoResult):
            return gathered
        pieces, views = gathered
        direct = image.direct_fd >= 0 and self._aligned(offset, length, pieces)
        fd = image.direct_fd if direct else image.fd
        fallback = image.direct_fd >= 0 and not direct
        einval = False
        done = 0
        while views:
            try:
                moved = os.pwritev(fd, views, offset + done) if write else os.preadv(fd, views, offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno_codes.EINVAL and fd == image.direct_fd and fd != image.fd:
                    fd, einval, fallback = image.fd, True, True
                    image.raise_alignment()
                    continue
                return IoResult(IoStatus.IO, done, _oserror(exc), direct, fallback, einval)
            if moved == 0:
                if write:
                    return IoResult(IoStatus.IO, done, errno_codes.EIO, direct, fallback, einval)
                for view in views:  # the file shrank under us: zeros past its end
                    view[:] = bytes(len(view))
                done = length
                break
            if moved > length - done:
                return IoResult(IoStatus.IO, done, errno_codes.EIO, direct, fallback, einval)
            done += moved
            while views and moved >= len(views[0]):
                moved -= len(views[0])
                views.pop(0)
            if views and moved:
                views[0] = views[0][moved:]
        return IoResult(IoStatus.OK, done, 0, direct, fallback, einval)

    def _guest_buffers(self, chain: DescriptorChain, write: bool, offset: int, skip: int,
                       length: int) -> tuple[list[_Piece], list[memoryview]] | IoResult:
        """The request's data buffers as views of guest memory (``(pieces, views)``), after the
        checks every data path makes; an :class:`IoResult` refusing the request otherwise."""
        image = self.image
        if image.fd < 0:
            return IoResult(IoStatus.ARGS)
        if write and image.readonly:
            return IoResult(IoStatus.READONLY)
        if not _range_ok(image, offset, length):
            return IoResult(IoStatus.RANGE)
        segments = chain.readable if write else chain.writable
        hosts = chain.host_addresses
        hosts = hosts[: chain.readable_count] if write else hosts[chain.readable_count :]
        pieces = _slice(segments, hosts, skip, length)
        if isinstance(pieces, IoStatus):
            return IoResult(pieces)
        views = []
        for piece in pieces:
            try:
                region, start = self.memory.translate(piece.gpa, piece.length)
            except GuestMemoryError:
                return IoResult(IoStatus.IOVEC)
            if (not write and region.readonly) or region.host_address + start != piece.host:
                return IoResult(IoStatus.IOVEC)
            views.append(memoryview(region.buffer)[start : start + piece.length])
        return pieces, views

    def _aligned(self, offset: int, length: int, pieces: Sequence[_Piece]) -> bool:
        mem, off = self.image.mem_align or 1, self.image.offset_align or 1
        if offset % off or length % off:
            return False
        return all(p.host % mem == 0 and p.length % mem == 0 and p.length % off == 0 for p in pieces)

    def discard(self, offset: int, length: int) -> IoResult:
        refused = self._check(offset, length)
        if refused is not None or not length:
            return refused or IoResult(IoStatus.OK)
        error = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if error and _unsupported(error):
            return IoResult(IoStatus.OK, emulated=True)
        if error:
            return IoResult(IoStatus.IO, error=error)
        return IoResult(IoStatus.OK, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> IoResult:
        refused = self._check(offset, length)
        if refused is not None or not length:
            return refused or IoResult(IoStatus.OK)
        error = errno_codes.EOPNOTSUPP
        if unmap:
            error = self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if error and _unsupported(error):
            error = self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        if error and _unsupported(error):
            return self._write_zeros(offset, length)
        if error:
            return IoResult(IoStatus.IO, error=error)
        return IoResult(IoStatus.OK, length)

    def flush(self) -> IoResult:
        if self.image.fd < 0:
            return IoResult(IoStatus.ARGS)
        while True:
            try:
                os.fdatasync(self.image.fd)
            except InterruptedError:
                continue
            except OSError as exc:
                return IoResult(IoStatus.IO, error=_oserror(exc))
            return IoResult(IoStatus.OK)

    def _check(self, offset: int, length: int) -> IoResult | None:
        if self.image.fd < 0:
            return IoResult(IoStatus.ARGS)
        if self.image.readonly:
            return IoResult(IoStatus.READONLY)
        if not _range_ok(self.image, offset, length):
            return IoResult(IoStatus.RANGE)
        return None

    def _fallocate(self, mode: int, offset: int, length: int) -> int:
        while True:
            if _libc.fallocate(self.image.fd, mode, offset, length) == 0:
                return 0
            error = ctypes.get_errno()
            if error != errno_codes.EINTR:
                return error

    def _write_zeros(self, offset: int, length: int) -> IoResult:
        done = 0
        while done < length:
            chunk = min(_ZERO_CHUNK, length - done)
            try:
                written = os.pwrite(self.image.fd, _ZEROS[:chunk], offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                return IoResult(IoStatus.IO, done, _oserror(exc), emulated=True)
            if written == 0:
                return IoResult(IoStatus.IO, done, errno_codes.EIO, emulated=True)
            done += written
        return IoResult(IoStatus.OK, done, emulated=True)


def _unsupported(error: int) -> bool:
    return error in (errno_codes.EOPNOTSUPP, errno_codes.ENOSYS, errno_codes.ENOTTY, errno_codes.ENODEV)


# -- the native (C) path ------------------------------------------------------------------------

_ffi: Any = None
_lib: Any = None
#: Why the native path is not used ("" when it is).
NATIVE_UNAVAILABLE_REASON = ""


def _load_native() -> None:
    global _ffi, _lib, NATIVE_UNAVAILABLE_REASON
    if os.environ.get("VMMKIT_BLK_NATIVE", "1") == "0":
        NATIVE_UNAVAILABLE_REASON = "disabled by VMMKIT_BLK_NATIVE=0"
        return
    try:
        from vmmkit_devices.virtio._native import ffi, lib
    except ImportError as exc:
        NATIVE_UNAVAILABLE_REASON = (f"vmmkit_devices.virtio._native is not built ({exc}); "
                                     "pip install -e plugins/devices")
        return
    mismatched = [s.name for s in IoStatus if s and getattr(lib, f"BLK_ERR_{s.name}") != s.value]
    if (mismatched or lib.BLK_MAX_IOV != MAX_IOV or lib.BLK_SECTOR_SIZE != SECTOR_SIZE
            or ffi.sizeof("struct iovec") != 16):
        NATIVE_UNAVAILABLE_REASON = f"vmmkit_devices.virtio._native disagrees with blk_io.py ({mismatched})"
        return
    _ffi, _lib = ffi, lib


_load_native()


def native_available() -> bool:
    return _lib is not None


class NativeBlockIo:
    """The C data path (``native/blk_io.c``); same results as :class:`PythonBlockIo`."""

    native: Final = True

    def __init__(self, image: DiskImage, memory: GuestMemory) -> None:
        if _lib is None:
            raise RuntimeError(f"the native block path is unavailable: {NATIVE_UNAVAILABLE_REASON}")
        self.image = image
        self.memory = memory
        self._disk = _ffi.new("struct blk_disk *")
        self._regions_source: tuple[Any, ...] = ()
        self._table: Any = None
        self._keep: Any = None
        self._sync_disk()

    def _sync_disk(self) -> Any:
        disk, image = self._disk, self.image
        disk.fd = image.fd
        disk.direct_fd = image.direct_fd
        disk.mem_align = image.mem_align
        disk.offset_align = image.offset_align
        disk.size = image.size
        disk.readonly = int(image.readonly)
        return disk

    def _memory_table(self) -> Any:
        """The C copy of the region table, rebuilt when guest memory changed."""
        regions = self.memory.regions
        if self._table is None or regions != self._regions_source:
            array = _ffi.new("struct blk_region[]", max(len(regions), 1))
            for slot, region in enumerate(regions):
                array[slot].gpa = region.start
                array[slot].host = _ffi.cast("uint8_t *", region.host_address)
                array[slot].size = region.size
                array[slot].readonly = int(region.readonly)
            table = _ffi.new("struct blk_memory *")
            table.regions = array
            table.count = len(regions)
            self._keep, self._table, self._regions_source = array, table, regions
        return self._table

    def _result(self, rc: int, out: Any) -> IoResult:
        if out.einval:
            self.image.raise_alignment()
            self._sync_disk()
        return IoResult(IoStatus(rc), int(out.bytes), int(out.error), bool(out.direct), bool(out.fallback),
                        bool(out.einval), bool(out.emulated))

    def transfer(self, chain: DescriptorChain, write: bool, offset: int, skip: int, length: int) -> IoResult:
        if not (0 <= offset < 1 << 64 and 0 <= length < 1 << 64):
            return IoResult(IoStatus.READONLY if write and self.image.readonly else IoStatus.RANGE)
        if not 0 <= skip < 1 << 64:
            return IoResult(IoStatus.ARGS)
        iov = chain.iovecs  # keep it alive across the call
        base = _ffi.cast("struct iovec *", iov.address)
        gpas = _ffi.cast("uint64_t *", iov.gpa_address)
        if write:
            first, count = 0, iov.readable
        else:
            first, count = iov.readable, iov.count - iov.readable
        out = _ffi.new("struct blk_result *")
        rc = _lib.blk_transfer(self._sync_disk(), self._memory_table(), int(write), offset, base + first,
                               gpas + first, count, skip, length, out)
        del iov
        return self._result(rc, out)

    def _refuse_unrepresentable(self, offset: int, length: int) -> IoResult | None:
        if 0 <= offset < 1 << 64 and 0 <= length < 1 << 64:
            return None
        return IoResult(IoStatus.READONLY if self.image.readonly else IoStatus.RANGE)

    def discard(self, offset: int, length: int) -> IoResult:
        if (refused := self._refuse_unrepresentable(offset, length)) is not None:
            return refused
        out = _ffi.new("struct blk_result *")
        return self._result(_lib.blk_discard(self._sync_disk(), offset, length, out), out)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> IoResult:
        if (refused := self._refuse_unrepresentable(offset, length)) is not None:
            return refused
        out = _ffi.new("struct blk_result *")
        return self._result(_lib.blk_write_zeroes(self._sync_disk(), offset, length, int(unmap), out), out)

    def flush(self) -> IoResult:
        out = _ffi.new("struct blk_result *")
        return self._result(_lib.blk_flush(self._sync_disk(), out), out)


class Qcow2BlockIo(PythonBlockIo):
    """The data path of a qcow2 image: guest memory <-> :class:`~.qcow2.Qcow2Image` (Python).

    DISCARD is accepted and skipped (``emulated``: the guest must not rely on it reading zeros,
    and the device offers no ``discard_zeroes``); WRITE_ZEROES writes zeros through the layer.
    A malformed table met while serving a request fails that request (``IO``, ``EIO``) and is logged.
    """

    def transfer(self, chain: DescriptorChain, write: bool, offset: int, skip: int, length: int) -> IoResult:
        image, qcow2 = self.image, self.image.qcow2
        if qcow2 is None:
            return IoResult(IoStatus.ARGS)
        gathered = self._guest_buffers(chain, write, offset, skip, length)
        if isinstance(gathered, IoResult):
            return gathered
        _, views = gathered
        try:
            if write:
                qcow2.write(offset, b"".join(bytes(view) for view in views))
            else:
                data = memoryview(qcow2.read(offset, length))
                for view in views:
                    view[:] = data[: len(view)]
                    data = data[len(view) :]
        except DeviceError as exc:
            log.warning("virtio_blk.qcow2_error", path=image.path, error=str(exc))
            return IoResult(IoStatus.IO, error=errno_codes.EIO)
        except OSError as exc:
            return IoResult(IoStatus.IO, error=_oserror(exc))
        return IoResult(IoStatus.OK, length)

    def discard(self, offset: int, length: int) -> IoResult:
        refused = self._check(offset, length)
        return refused or IoResult(IoStatus.OK, emulated=bool(length))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> IoResult:
        refused = self._check(offset, length)
        if refused is not None or not length:
            return refused or IoResult(IoStatus.OK)
        qcow2 = self.image.qcow2
        assert qcow2 is not None
        done = 0
        try:
            while done < length:
                chunk = min(_ZERO_CHUNK, length - done)
                qcow2.write(offset + done, _ZEROS[:chunk])
                done += chunk
        except DeviceError as exc:
            log.warning("virtio_blk.qcow2_error", path=self.image.path, error=str(exc))
            return IoResult(IoStatus.IO, done, errno_codes.EIO, emulated=True)
        except OSError as exc:
            return IoResult(IoStatus.IO, done, _oserror(exc), emulated=True)
        return IoResult(IoStatus.OK, done, emulated=True)

    def flush(self) -> IoResult:
        if self.image.fd < 0:
            return IoResult(IoStatus.ARGS)
        try:
            os.fsync(self.image.fd)  # the metadata too: the file grows as clusters are allocated
        except OSError as exc:
            return IoResult(IoStatus.IO, error=_oserror(exc))
        return IoResult(IoStatus.OK)


BlockIo = PythonBlockIo | NativeBlockIo


def make_block_io(image: DiskImage, memory: GuestMemory, native: bool | None = None) -> BlockIo:
    """The native path when built (or ``native=True``, which then must be), else the Python one."""
    if image.qcow2 is not None:
        return Qcow2BlockIo(image, memory)
    if native is None:
        native = native_available()
    if native:
        return NativeBlockIo(image, memory)
    return PythonBlockIo(image, memory)


# -- a whole request queue served in C ---------------------------------------------------------

#: ``struct blkq``'s counters, in ``blk_queue.h``'s order (``direct_einval``: O_DIRECT refused an
#: alignment and it was raised; ``overlapped_requests``: served at once with others on the pool).
QUEUE_COUNTERS: Final = ("read_bytes", "write_bytes", "read_ops", "write_ops", "flush_ops", "discard_ops",
                         "write_zeroes_ops", "get_id_ops", "io_errors", "invalid_requests",
                         "unsupported_requests", "direct_ops", "direct_fallbacks", "direct_einval",
                         "overlapped_requests")


class QueueRun(enum.IntEnum):
    """Why :meth:`NativeQueue.run` returned (``blk_queue.h``'s ``BLKQ_*``)."""

    STOPPED = 0  #: :meth:`NativeQueue.stop` was called
    SIGNAL = 1  #: the driver wants an interrupt and the queue has no irqfd: trigger it, run again
    BROKEN = 2  #: the driver broke the protocol (:attr:`NativeQueue.error`)
    IDLE = 3  #: :meth:`NativeQueue.process` found nothing more to pop


#: (the walker's function pointer, its module), once loaded.
_WALKER: Any = None
NATIVE_QUEUE_UNAVAILABLE_REASON = ""


def _load_walker() -> None:
    """The SDK's C chain walker (``vmmkit.virtio._native``), whose address the C queue calls:
    the walker the SDK fuzzes is the one used. Its structures must match ``blk_queue.h``'s."""
    global _WALKER, NATIVE_QUEUE_UNAVAILABLE_REASON
    if _lib is None:
        NATIVE_QUEUE_UNAVAILABLE_REASON = NATIVE_UNAVAILABLE_REASON
        return
    if os.environ.get("VMMKIT_BLK_QUEUE_NATIVE", "1") == "0":
        NATIVE_QUEUE_UNAVAILABLE_REASON = "disabled by VMMKIT_BLK_QUEUE_NATIVE=0"
        return
    from vmmkit.virtio import chain

    if not chain.native_available():
        NATIVE_QUEUE_UNAVAILABLE_REASON = f"the SDK's C walker is unavailable: {chain.native_unavailable_reason()}"
        return
    import importlib

    core = importlib.import_module("vmmkit.virtio._native")
    pairs = (("struct vq_region", "struct blkq_vq_region", ("gpa", "size", "host", "readonly")),
             ("struct vq_memory", "struct blkq_vq_memory", ("regions", "count")),
             ("struct vq_chain", "struct blkq_vq_chain",
              ("count", "readable", "descriptors", "readable_bytes", "writable_bytes")))
    for theirs, ours, fields in pairs:
        if core.ffi.sizeof(theirs) != _ffi.sizeof(ours) or any(
                core.ffi.offsetof(theirs, f) != _ffi.offsetof(ours, f) for f in fields):
            NATIVE_QUEUE_UNAVAILABLE_REASON = f"{theirs} differs from blk_queue.h's {ours}"
            return
    address = int(core.ffi.cast("uintptr_t", core.ffi.addressof(core.lib, "vq_walk_chain")))
    _WALKER = (_ffi.cast("blkq_walk_fn", address), core)


_load_walker()


def native_queue_available() -> bool:
    """Whether whole queues can be served in C (:class:`NativeQueue`)."""
    return _WALKER is not None


class NativeQueue:
    """One virtio-blk request queue served by ``native/blk_queue.c`` on the calling thread,
    without the GIL (cffi releases it around :meth:`run`).

    :param image: the raw image (not qcow2).
    :param memory: guest memory (its region table is copied; :meth:`refresh_memory` re-copies).
    :param kick_fd: the queue's notification eventfd.
    :param wake_fd: an eventfd written by :meth:`stop` (may be shared by a device's queues).
    :param irq_fd: an eventfd whose write raises the queue's interrupt, or -1 (then :meth:`run`
        returns :attr:`QueueRun.SIGNAL` for the caller to trigger it).
    :param serial: the 20-byte GET_ID answer.
    :param flags: ``BLKQ_F_*`` bits of ``blk_queue.h`` (see :func:`queue_flags`).
    :param max_segments: the most segments one chain may have.
    :param in_flight: requests served at once (a pool of ``in_flight - 1`` C threads, started on
        first use): consecutive IN/OUT requests on disjoint guest buffers and disjoint disk bytes
        are served together, anything else one at a time, in ring order.
    """

    def __init__(self, image: DiskImage, memory: GuestMemory, *, kick_fd: int, wake_fd: int, irq_fd: int,
                 serial: bytes, flags: int, max_segments: int, in_flight: int = 1) -> None:
        if _WALKER is None:
            raise RuntimeError(f"the native block queue is unavailable: {NATIVE_QUEUE_UNAVAILABLE_REASON}")
        if not 1 <= in_flight <= _lib.BLKQ_MAX_SLOTS:
            raise ValueError(f"in_flight must be 1 to {_lib.BLKQ_MAX_SLOTS}, not {in_flight}")
        self.image = image
        self.memory = memory
        # ffi.gc: the C pool's threads are stopped even if close() is never called.
        q = _ffi.gc(_ffi.new("struct blkq *"), _lib.blkq_release)
        self._q = q
        self._iov = _ffi.new("struct iovec[]", max_segments * in_flight)
        self._gpa = _ffi.new("uint64_t[]", max_segments * in_flight)
        q.walk = _WALKER[0]
        q.iov, q.gpa, q.max_segments, q.slots = self._iov, self._gpa, max_segments, in_flight
        q.kick_fd, q.wake_fd, q.irq_fd = kick_fd, wake_fd, irq_fd
        q.epoll_fd = -1
        q.flags = flags
        q.serial = serial[:20].ljust(20, b"\0")
        self._regions_source: tuple[Any, ...] = ()
        self._keep: tuple[Any, ...] = ()
        self.refresh_memory()
        self.sync_disk()

    def sync_disk(self) -> None:
        """Copy the image's descriptors, alignment and size (after a resize)."""
        disk, image = self._q.disk, self.image
        disk.fd, disk.direct_fd = image.fd, image.direct_fd
        disk.mem_align, disk.offset_align = image.mem_align, image.offset_align
        disk.readonly = int(image.readonly)
        disk.size = image.size

    def refresh_memory(self) -> bool:
        """Copy guest memory's region table again if it changed (memory hotplug); whether it did."""
        regions = self.memory.regions
        if regions == self._regions_source:
            return False
        count = max(len(regions), 1)
        vq = _ffi.new("struct blkq_vq_region[]", count)
        blk = _ffi.new("struct blk_region[]", count)
        for slot, region in enumerate(regions):
            host = _ffi.cast("uint8_t *", region.host_address)
            vq[slot].gpa, vq[slot].size, vq[slot].host = region.start, region.size, host
            vq[slot].readonly = int(region.readonly)
            blk[slot].gpa, blk[slot].size, blk[slot].host = region.start, region.size, host
            blk[slot].readonly = int(region.readonly)
        vq_mem = _ffi.new("struct blkq_vq_memory *")
        vq_mem.regions, vq_mem.count = vq, len(regions)
        blk_mem = _ffi.new("struct blk_memory *")
        blk_mem.regions, blk_mem.count = blk, len(regions)
        # The old tables stay alive until the new ones are in place (the queue is not running).
        self._q.vq_mem, self._q.blk_mem = vq_mem, blk_mem
        self._keep = (vq, blk, vq_mem, blk_mem)
        self._regions_source = regions
        return True

    def load(self, queue: Virtqueue) -> None:
        """Take the queue's rings and position (before :meth:`run`)."""
        q = self._q
        q.desc_gpa, q.avail_gpa, q.used_gpa, q.size = queue.desc_table, queue.avail_ring, queue.used_ring, queue.size
        q.flags = (q.flags & ~(_lib.BLKQ_F_EVENT_IDX | _lib.BLKQ_F_INDIRECT)
                   | (_lib.BLKQ_F_EVENT_IDX if queue.event_idx else 0)
                   | (_lib.BLKQ_F_INDIRECT if queue.indirect else 0))
        position = queue.position()
        q.last_avail, q.next_used = position["last_avail_idx"], position["next_used"]
        signalled = position["signalled_used"]
        q.signalled_valid = int(signalled is not None)
        q.signalled_used = signalled or 0

    def store(self, queue: Virtqueue) -> None:
        """Give the position back to the queue (a snapshot saves it; the Python path may go on)."""
        q = self._q
        queue.restore_position({"last_avail_idx": q.last_avail, "next_used": q.next_used,
                                "signalled_used": q.signalled_used if q.signalled_valid else None,
                                "notify": True})
        if q.counters[QUEUE_COUNTERS.index("direct_einval")] and self.image.offset_align < FALLBACK_DIO_ALIGN:
            self.image.raise_alignment()

    def run(self) -> QueueRun:
        """Serve until stopped, a signal to send, or an error (the GIL is released meanwhile)."""
        return QueueRun(_lib.blkq_run(self._q))

    def process(self) -> QueueRun:
        """Serve what is available now, without waiting."""
        return QueueRun(_lib.blkq_process(self._q))

    def stop(self) -> None:
        """Make :meth:`run` return (from any thread); it keeps returning until :meth:`allow`."""
        self._q.stop = 1

    def allow(self) -> None:
        self._q.stop = 0

    @property
    def error(self) -> tuple[int, str]:
        """``(ErrorKind value, message)`` of the last :attr:`QueueRun.BROKEN`."""
        return int(self._q.error_kind), _ffi.string(self._q.message).decode(errors="replace")

    def counters(self) -> dict[str, int]:
        values = _ffi.unpack(self._q.counters, len(QUEUE_COUNTERS))
        return dict(zip(QUEUE_COUNTERS, values, strict=True))

    def close(self) -> None:
        _lib.blkq_release(self._q)


def queue_flags(*, flush: bool, discard: bool, write_zeroes: bool, sparse: bool) -> int:
    """``struct blkq``'s feature flags (the ring flags come from the queue in :meth:`NativeQueue.load`)."""
    assert _lib is not None
    return ((_lib.BLKQ_F_FLUSH if flush else 0) | (_lib.BLKQ_F_DISCARD if discard else 0)
            | (_lib.BLKQ_F_WRITE_ZEROES if write_zeroes else 0) | (_lib.BLKQ_F_SPARSE if sparse else 0))
