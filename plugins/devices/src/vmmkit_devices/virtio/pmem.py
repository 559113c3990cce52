"""virtio-pmem (virtio 1.2, section 5.19, "PMEM device"): device type ``virtio-pmem``, from
``VmConfig.pmem`` (``--pmem file=,size=,discard_writes=``, ``vm.add-pmem``), as Cloud
Hypervisor's ``virtio_devices::Pmem`` with ``DeviceManager::make_virtio_pmem_device``.

The backing file is mapped into the guest as device memory (:mod:`vmmkit.device_memory`): a
2 MiB-aligned range of the 64-bit device window, above RAM and the memory hotplug area, never in
the e820 table; the guest learns it only from the configuration space::

    struct virtio_pmem_config { le64 start; le64 size; }

``MAP_SHARED`` of the file opened read-write, or with ``discard_writes=on`` ``MAP_PRIVATE`` of
the file opened read-only (the guest writes to private copies, lost when the VM goes). Linux's
``virtio_pmem`` driver (``drivers/nvdimm/virtio_pmem.c``) registers the range as an nvdimm
region: ``/dev/pmem0``, with DAX.

One request queue; each chain is ``struct virtio_pmem_req { le32 type; }`` (device-readable)
then ``struct virtio_pmem_resp { le32 ret; }`` (device-writable). Type 0, FLUSH
(``nd_virtio.c``: ``virtio_pmem_flush``, sent for ``REQ_PREFLUSH`` bios and ``fsync`` on a
DAX file system), is answered once the file's data is durable: ``fsync`` of the backing file
(the mapping is ``MAP_SHARED``, so it writes back the pages the guest dirtied through it, as
QEMU's ``virtio_pmem_flush`` and CH's ``sync_all`` rely on); ``ret`` 0, or 1 (EIO) when
``fsync`` fails or the request is not a 4-byte FLUSH. FLUSH blocks on the disk, so the queue
is served on a worker thread of its own (``<id>_q0``), never on a vCPU or the event loop.
A chain without a 4-byte device-writable buffer cannot be answered: the device fails
(``DEVICE_NEEDS_RESET``), the VMM does not.

The backing file, as CH: ``size`` defaults to the file's size; both must be multiples of 2 MiB.
A directory with ``size=`` gets an unnamed temporary file of that size in it (``O_TMPFILE``);
a directory without ``size=`` is refused. Unlike CH (which maps past the end of a short file,
and a guest touching it faults the VMM with ``SIGBUS``), a regular file shorter than ``size``
is extended to ``size`` (``ftruncate``: a sparse tail of zeros); with ``discard_writes=on`` (a
read-only open) a short file is refused instead. Only regular files and block devices map.

Counters: ``flushes``, ``flush_errors``, ``bad_requests``. Snapshot state: where the region
is and how big (``start``, ``size``): a restore maps the file at the same place (checked);
the file's content is the user's, not the snapshot's.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.config import ConfigError
from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.state import StateError
from vmmkit.virtio.queue import Virtqueue
from vmmkit_devices.device_types import VirtioPmemType as VirtioPmemType  # declared there, re-exported
from vmmkit_devices.virtio.common import QueueDevice

if TYPE_CHECKING:
    from vmmkit.config import PmemConfig
    from vmmkit.device import DeviceContext, DeviceRequest
    from vmmkit.device_memory import DeviceMemoryRegion

log = get_logger()

VIRTIO_ID_PMEM: Final = 27
#: Cloud Hypervisor's ``QUEUE_SIZE`` for pmem.
QUEUE_SIZE: Final = 256
#: Region and file size granularity (CH: "The memory needs to be 2MiB aligned in order to
#: support hugepages").
ALIGNMENT: Final = 2 << 20

REQ_TYPE_FLUSH: Final = 0
RESP_OK: Final = 0
RESP_EIO: Final = 1

CONFIG: Final = struct.Struct("<QQ")
REQUEST: Final = struct.Struct("<I")
RESPONSE: Final = struct.Struct("<I")

_MAP_NORESERVE: Final = getattr(mmap, "MAP_NORESERVE", 0x4000)


class PmemDevice(QueueDevice):
    """A virtio-pmem device over ``buffer`` (the mapped backing file, ``fd``), which the guest
    reaches at ``region``. The device owns all three: :meth:`release` unmaps the region from
    the guest, then the host mapping, then closes the file."""

    device_type = VIRTIO_ID_PMEM
    name = "virtio-pmem"
    own_threads: ClassVar[bool] = True  # FLUSH is an fsync: not on the event loop

    def __init__(self, device_id: str, *, fd: int, buffer: mmap.mmap, region: DeviceMemoryRegion,
                 path: str, discard_writes: bool, pin: object = None) -> None:
        super().__init__(device_id, [QUEUE_SIZE], 0)
        self.fd = fd
        self.buffer: mmap.mmap | None = buffer
        self._pin = pin  # holds an export of ``buffer`` (its host address is the guest's)
        self.region = region
        self.path = path
        self.discard_writes = discard_writes
        for name in ("flushes", "flush_errors", "bad_requests"):
            self.count(name, 0)

    @property
    def start(self) -> int:
        return self.region.start

    @property
    def size(self) -> int:
        return self.region.size

    def config_space(self) -> bytes:
        return CONFIG.pack(self.start, self.size)

    def describe(self) -> Mapping[str, Any]:
        return {"file": self.path, "start": self.start, "size": self.size, "discard_writes": self.discard_writes}

    # -- the driver's requests ---------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        served = 0
        while self.running():
            chain = queue.pop()
            if chain is None:
                break
            if chain.writable_bytes < RESPONSE.size:
                self.fail(queue, f"virtio-pmem request {chain.head} has no 4-byte device-writable response buffer")
                return
            ret = self.handle(chain.read(REQUEST.size + 1), chain.readable_bytes)
            queue.add_used(chain.head, chain.write(RESPONSE.pack(ret)))
            served += 1
        if served:
            self.signal(queue)

    def handle(self, request: bytes, readable_bytes: int) -> int:
        """The ``ret`` for one request (``request``: its first readable bytes, all the guest's)."""
        if readable_bytes != REQUEST.size or len(request) != REQUEST.size:
            self.count("bad_requests")
            return RESP_EIO
        (kind,) = REQUEST.unpack(request)
        if kind != REQ_TYPE_FLUSH:
            self.count("bad_requests")
            return RESP_EIO
        return self.flush()

    def flush(self) -> int:
        """Make what the guest wrote through the mapping durable: ``fsync`` of the file."""
        self.count("flushes")
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.count("flush_errors")
            log.warning("virtio_pmem.flush_failed", device=self.id, file=self.path, error=exc.strerror)
            return RESP_EIO
        return RESP_OK

    # -- snapshots ----------------------------------------------------------------------------

    def device_state(self) -> Mapping[str, Any]:
        return {"start": self.start, "size": self.size}

    def restore_device_state(self, state: Mapping[str, Any]) -> None:
        saved = (state.get("start"), state.get("size"))
        if saved != (self.start, self.size):
            raise StateError(f"{self.id}: the snapshot has the pmem region at {saved}, this VM maps "
                             f"{self.path} at ({self.start}, {self.size})")

    # -- lifetime ------------------------------------------------------------------------------

    def release(self) -> None:
        if not self.region.unmap():
            return  # the guest may still reach the mapping (emu once vCPUs exist): keep it until exit
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self._pin = None
            try:
                buffer.close()
            except BufferError:
                pass
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# -- the backing file (as CH's make_virtio_pmem_device) -----------------------------------------


def _refuse(option: str, config: PmemConfig, reason: str) -> ConfigError:
    return ConfigError(option, config.file, "file=<regular file or block device of a multiple of 2 MiB>",
                       reason=f"{config.file} {reason}")


def open_backing(config: PmemConfig, option: str = "--pmem") -> tuple[int, int]:
    """Open the backing file of ``config``: ``(fd, size)``, the file at least ``size`` long.

    :raises ConfigError: a directory without ``size``, a missing or special file, a size that
        is not a multiple of 2 MiB, a short file that cannot be extended.
    """
    path, size = config.file, config.size
    if os.path.isdir(path):
        if size is None:
            raise _refuse(option, config, "is a directory: give size= for a temporary file in it")
        try:
            fd = os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _refuse(option, config, f"no temporary file in this directory: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise _refuse(option, config, f"cannot size a temporary file: {exc.strerror}") from None
        return fd, size
    flags = (os.O_RDONLY if config.discard_writes else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _refuse(option, config, f"cannot be opened: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise _refuse(option, config, "is neither a regular file nor a block device")
        length = os.lseek(fd, 0, os.SEEK_END)
        if size is None:
            size = length
        if size <= 0 or size % ALIGNMENT:
            raise _refuse(option, config, f"has size {size}, not a positive multiple of 2 MiB")
        if length < size:
            if config.discard_writes or not stat.S_ISREG(mode):
                why = "discard_writes=on opens it read-only" if config.discard_writes else "a block device"
                raise _refuse(option, config, f"is {length} bytes, shorter than size={size} (and cannot grow: {why})")
            os.ftruncate(fd, size)
            log.info("virtio_pmem.file_extended", file=path, old_size=length, size=size)
    except ConfigError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise _refuse(option, config, exc.strerror or str(exc)) from None
    return fd, size


def create(ctx: DeviceContext, request: DeviceRequest) -> PmemDevice:
    """``VirtioPmemType.create`` (declared in :mod:`vmmkit_devices.device_types`): ``request.config``
    is the VM's :class:`vmmkit.config.PmemConfig`."""
    config = request.config
    if config is None or not hasattr(config, "file"):
        raise DeviceError(f"{request.id}: virtio-pmem needs a PmemConfig")
    fd, size = open_backing(config)
    buffer: mmap.mmap | None = None
    pin: Any = None
    try:
        share = mmap.MAP_PRIVATE if config.discard_writes else mmap.MAP_SHARED
        buffer = mmap.mmap(fd, size, flags=share | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        pin = (ctypes.c_char * size).from_buffer(buffer)  # an export: the mapping cannot close under the guest
        region = ctx.map_device_memory(ctypes.addressof(pin), size, alignment=ALIGNMENT)
    except BaseException as exc:
        if buffer is not None:
            pin = None
            buffer.close()
        os.close(fd)
        if isinstance(exc, OSError):
            raise DeviceError(f"{request.id}: cannot map {config.file}: {exc.strerror}") from None
        raise
    device = PmemDevice(request.id, fd=fd, buffer=buffer, region=region, path=config.file,
                        discard_writes=config.discard_writes, pin=pin)
    log.info("virtio_pmem.mapped", device=request.id, file=config.file, start=region.start, size=size,
             discard_writes=config.discard_writes)
    return device
