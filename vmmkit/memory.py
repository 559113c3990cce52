"""Guest memory: mmap-backed regions and bounds-checked guest-physical access.

Every address handed to these methods may come from the guest, so every access is checked
against the region table; a bad address raises :class:`GuestMemoryError` and touches nothing.
An access must lie inside one region (virtio buffers that cross a region boundary are split
by the caller with :meth:`GuestMemory.split`).
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from attrs import define, field, frozen

from vmmkit.errors import GuestMemoryError

PAGE_SIZE: Final = mmap.PAGESIZE
_MAP_NORESERVE: Final = 0x4000
_MFD_HUGETLB: Final = 0x0004
_MFD_HUGE_SHIFT: Final = 26


@frozen
class MemoryRange:
    """A guest-physical range ``[start, start + size)``."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.start <= addr and addr + length <= self.end and length >= 0

    def overlaps(self, other: MemoryRange) -> bool:
        return self.start < other.end and other.start < self.end


@define(eq=False)
class GuestRegion:
    """One mapping of guest RAM: where the guest sees it and where the host has it."""

    range: MemoryRange
    buffer: mmap.mmap
    host_address: int
    fd: int | None = None
    slot: int = 0
    readonly: bool = False
    #: Where the region starts in ``fd`` (a file-backed memory zone's second piece; 0 for a memfd).
    fd_offset: int = 0
    #: The named file whose bytes are this RAM (a ``shared=on`` memory zone's ``file``): they
    #: are the guest's RAM at power-on too, so a reset leaves them.
    backing_file: str | None = None
    _pin: object = field(default=None, repr=False)

    @property
    def start(self) -> int:
        return self.range.start

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Give the host pages of ``[offset, offset + length)`` (default: the whole region) back;
        anonymous and memfd memory reads as zeros there next, as at power-on. The one way vmmkit
        releases guest pages (reboot, DIMM eject, virtio-mem unplug, the balloon): shared and
        huge-page memory is a memfd, whose pages ``MADV_DONTNEED`` would only unmap (they come
        back with their contents), so a hole is punched instead (``MADV_REMOVE``, Cloud
        Hypervisor's ``release_memory_range`` punches the file too). A restored snapshot's
        copy-on-write mapping drops its private copies and reads the file's pages again.

        :raises OSError: the host refused (e.g. a range not aligned to the huge page size).
        """
        length = self.size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestMemoryError(f"discard {offset:#x}+{length:#x} is outside a {self.size:#x}-byte region")
        advice = mmap.MADV_REMOVE if self.fd is not None else mmap.MADV_DONTNEED
        if length:
            _madvise(self.host_address + offset, length, advice)

    @property
    def size(self) -> int:
        return self.range.size


class GuestMemory:
    """The guest's RAM, as a sorted, non-overlapping set of host mappings."""

    def __init__(self, regions: Iterable[GuestRegion] = ()) -> None:
        #: (regions sorted by start, their starts): replaced as a whole, never changed in place.
        self._table: tuple[list[GuestRegion], list[int]] = ([], [])
        #: Called after each change of the region table (memory hotplug): a vhost-user frontend
        #: sends its backend the new table. See :meth:`add_listener`.
        self._listeners: list[Callable[[], None]] = []
        for region in regions:
            self.add_region(region)

    @classmethod
    def allocate(
        cls,
        ranges: Iterable[MemoryRange],
        *,
        shared: bool = False,
        hugepages: bool = False,
        hugepage_size: int | None = None,
        thp: bool = True,
        mergeable: bool = False,
        prefault: bool = False,
    ) -> GuestMemory:
        """Map anonymous (or, with ``shared``, memfd-backed) memory for each range; with
        ``hugepages``, a hugetlbfs memfd of ``hugepage_size`` pages (default: the host's
        default huge page size), reserved when mapped so that a host without enough free huge
        pages fails here rather than with ``SIGBUS`` when the guest touches its memory.

        A shared region keeps its memfd so it can be handed to another process (vhost-user).

        :raises MemoryAllocationError: the host cannot provide the memory.
        """
        memory = cls()
        try:
            for slot, rng in enumerate(ranges):
                memory.add_region(
                    map_region(rng, slot, shared=shared, hugepages=hugepages, hugepage_size=hugepage_size,
                                thp=thp, mergeable=mergeable, prefault=prefault)
                )
        except BaseException:
            memory.close()
            raise
        return memory

    # -- the region table ------------------------------------------------------------------

    def add_region(self, region: GuestRegion) -> None:
        """Add a region; safe while other threads read guest memory (memory hotplug): the
        table is replaced, never changed in place."""
        for other in self._regions:
            if other.range.overlaps(region.range):
                raise GuestMemoryError(f"region {region.range} overlaps {other.range}")
        regions = sorted([*self._regions, region], key=lambda r: r.start)
        self._publish(regions)

    def remove_region(self, start: int) -> GuestRegion:
        """Take the region starting at ``start`` out of the table (its mapping stays open
        until :func:`close_region`); safe while other threads read guest memory."""
        region = next((r for r in self._regions if r.start == start), None)
        if region is None:
            raise GuestMemoryError(f"no guest memory region starts at {start:#x}")
        self._publish([r for r in self._regions if r is not region])
        return region

    def _publish(self, regions: list[GuestRegion]) -> None:
        self._table = (regions, [r.start for r in regions])
        for listener in list(self._listeners):
            listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the thread that changed it) after every change of the region
        table; it must not raise."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def _regions(self) -> list[GuestRegion]:
        return self._table[0]

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        return tuple(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def last_address(self) -> int:
        return self._regions[-1].range.end - 1 if self._regions else 0

    def find_region(self, gpa: int) -> GuestRegion | None:
        regions, starts = self._table  # one snapshot: the table may be replaced meanwhile
        index = bisect.bisect(starts, gpa) - 1
        if index >= 0:
            region = regions[index]
            if gpa < region.range.end:
                return region
        return None

    def translate(self, gpa: int, length: int) -> tuple[GuestRegion, int]:
        """The region holding ``[gpa, gpa + length)`` and the offset of ``gpa`` in it."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest access {gpa:#x}+{length:#x}")
        region = self.find_region(gpa)
        if region is None or gpa + length > region.range.end:
            raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")
        return region, gpa - region.start

    def is_valid(self, gpa: int, length: int) -> bool:
        try:
            self.translate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def split(self, gpa: int, length: int) -> Iterator[tuple[int, int]]:
        """Break ``[gpa, gpa + length)`` into per-region ``(gpa, length)`` pieces."""
        while length > 0:
            region = self.find_region(gpa)
            if region is None:
                raise GuestMemoryError(f"guest access {gpa:#x}+{length:#x} is outside guest RAM")
            piece = min(length, region.range.end - gpa)
            yield gpa, piece
            gpa += piece
            length -= piece

    # -- access ----------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory (valid until the memory is closed)."""
        region, offset = self.translate(gpa, length)
        return memoryview(region.buffer)[offset : offset + length]

    def host_address(self, gpa: int, length: int = 1) -> int:
        """The host virtual address of ``gpa``, for native code; the range is checked."""
        region, offset = self.translate(gpa, length)
        return region.host_address + offset

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self.translate(gpa, length)
        return region.buffer[offset : offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self.translate(gpa, len(data))
        region.buffer[offset : offset + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        for piece_gpa, piece_len in self.split(gpa, length):
            region, offset = self.translate(piece_gpa, piece_len)
            region.buffer[offset : offset + piece_len] = bytes([byte]) * piece_len

    def discard(self, gpa: int, length: int) -> None:
        """Give the host pages of ``[gpa, gpa + length)`` back (virtio-mem's unplug; see
        :meth:`GuestRegion.discard`). Page aligned, inside RAM."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard {gpa:#x}+{length:#x} is not page aligned")
        for piece_gpa, piece_len in self.split(gpa, length):
            region, offset = self.translate(piece_gpa, piece_len)
            region.discard(offset, piece_len)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string of at most ``limit`` bytes (clamped to the region)."""
        region = self.find_region(gpa)
        if region is None:
            raise GuestMemoryError(f"guest access {gpa:#x} is outside guest RAM")
        data = self.read(gpa, min(limit, region.range.end - gpa))
        end = data.find(b"\0")
        return data if end < 0 else data[:end]

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        for region in self._regions:
            close_region(region)
        self._table = ([], [])

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_region(region: GuestRegion) -> None:
    """Unmap a region (and close its memfd) that no :class:`GuestMemory` holds any more."""
    region._pin = None
    try:
        region.buffer.close()
    except BufferError:  # a view is still alive (an error's traceback): unmapped when it goes
        pass
    if region.fd is not None:
        os.close(region.fd)
        region.fd = None


def map_region(
    rng: MemoryRange,
    slot: int,
    *,
    shared: bool,
    hugepages: bool,
    hugepage_size: int | None,
    thp: bool,
    mergeable: bool,
    prefault: bool,
) -> GuestRegion:
    """Map ``rng`` of guest RAM for memory ``slot`` (see :meth:`GuestMemory.allocate` for the
    options); the caller adds it to a :class:`GuestMemory` (which closes it) or closes it.

    :raises MemoryAllocationError: the host cannot provide the memory.
    """
    if rng.size <= 0 or rng.size % PAGE_SIZE or rng.start % PAGE_SIZE:
        raise GuestMemoryError(f"region {rng} is not page aligned")
    # Huge pages are reserved at mmap (no MAP_NORESERVE): a short pool fails now, not later.
    flags = (0 if hugepages else _MAP_NORESERVE) | (mmap.MAP_POPULATE if prefault else 0)
    fd: int | None = None
    try:
        if shared or hugepages:
            memfd_flags = os.MFD_CLOEXEC
            if hugepages:
                memfd_flags |= _MFD_HUGETLB | _huge_size_flag(hugepage_size)
            fd = os.memfd_create(f"vmmkit-ram{slot}", memfd_flags)
            os.ftruncate(fd, rng.size)
            buffer = mmap.mmap(fd, rng.size, flags=flags | mmap.MAP_SHARED)
        else:
            buffer = mmap.mmap(-1, rng.size, flags=flags | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError, ValueError) as exc:
        if fd is not None:
            os.close(fd)
        raise MemoryAllocationError(_allocation_failure(rng.size, hugepages, hugepage_size, exc)) from None
    if thp and not hugepages:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    if mergeable:
        buffer.madvise(mmap.MADV_MERGEABLE)
    pin = _ffi().from_buffer(buffer)  # holds an export: the mapping cannot be closed under the guest
    return GuestRegion(rng, buffer, int(_ffi().cast("uintptr_t", pin)), fd=fd, slot=slot, pin=pin)


class MemoryAllocationError(GuestMemoryError):
    """The host cannot provide the guest's memory (too large, or too few free huge pages)."""


def check_allocatable(size: int, *, hugepages: bool = False, hugepage_size: int | None = None) -> None:
    """Refuse, before anything is built, guest RAM of ``size`` bytes the host can never provide:
    more than the address space can map, or more huge pages than are free. (Cloud Hypervisor
    finds out at ``vm.boot``; checking at ``vm.create`` answers a bad request with 400.)
    Passing does not promise the memory: it is committed as the guest touches it.

    :raises MemoryAllocationError: with the reason and what to change.
    """
    if hugepages:
        page = hugepage_size or _default_huge_page_size()
        available = _free_huge_pages(page)
        if available * page < size:
            raise MemoryAllocationError(
                f"{_human(size)} of guest RAM in huge pages needs {-(-size // page)} free {_human(page)} "
                f"huge pages; the host has {available} (see /proc/meminfo HugePages_Free, set "
                f"/sys/kernel/mm/hugepages/hugepages-{page >> 10}kB/nr_hugepages, or use hugepages=off)"
            )
        return
    try:  # reserve address space only: PROT_NONE, no commit
        probe = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, prot=0)
    except (OSError, OverflowError, ValueError) as exc:
        raise MemoryAllocationError(_allocation_failure(size, False, None, exc)) from None
    probe.close()


def _allocation_failure(size: int, hugepages: bool, hugepage_size: int | None, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if hugepages:
        page = hugepage_size or _default_huge_page_size()
        return (f"cannot allocate {_human(size)} of guest RAM in {_human(page)} huge pages: {reason} "
                f"(the host has {_free_huge_pages(page)} free; see /proc/meminfo HugePages_Free, "
                "or use hugepages=off)")
    return f"cannot allocate {_human(size)} of guest RAM: {reason} (choose a smaller --memory size)"


def _huge_size_flag(hugepage_size: int | None) -> int:
    """``MFD_HUGE_<size>``: log2 of the page size in bits 26-31 (memfd_create(2)); 0: the default."""
    if hugepage_size is None:
        return 0
    return (hugepage_size.bit_length() - 1) << _MFD_HUGE_SHIFT


def _default_huge_page_size() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 20


def _free_huge_pages(page: int) -> int:
    """Free huge pages of ``page`` bytes not promised to a mapping already (free - reserved)."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{page >> 10}kB"
    try:
        with open(f"{base}/free_hugepages", encoding="ascii") as free, \
                open(f"{base}/resv_hugepages", encoding="ascii") as reserved:
            return max(0, int(free.read()) - int(reserved.read()))
    except (OSError, ValueError):
        return 0  # no pool of that size on this host


def _human(size: int) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift:
            exact = size % (1 << shift) == 0
            return f"{size >> shift} {unit}" if exact else f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


def _madvise(address: int, length: int, advice: int) -> None:
    """``madvise(2)`` by address (a region's buffer may be a view of a larger mapping)."""
    import ctypes  # rare (discards), and ctypes costs milliseconds to import

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(address), length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({address:#x}, {length:#x}, {advice}): {os.strerror(err)}")


def _ffi() -> Any:
    """cffi's backend (a dependency anyway; ctypes costs milliseconds to import), no cdef needed."""
    import _cffi_backend

    return _cffi_backend.FFI()
