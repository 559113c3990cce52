from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmkit.errors import GuestMemoryError
from vmmkit.memory import GuestMemory, MemoryRange

MIB = 1 << 20


@pytest.fixture
def memory():
    with GuestMemory.allocate([MemoryRange(0, 2 * MIB), MemoryRange(4 * MIB, MIB)]) as mem:
        yield mem


def test_reads_return_what_was_written(memory: GuestMemory) -> None:
    memory.write(0x1000, b"hello")
    memory.write_u64(4 * MIB + 8, 0x1122334455667788)
    assert memory.read(0x1000, 5) == b"hello"
    assert memory.read_u32(4 * MIB + 8) == 0x55667788
    assert memory.read_u64(4 * MIB + 8) == 0x1122334455667788


def test_views_are_zero_copy(memory: GuestMemory) -> None:
    view = memory.view(0x2000, 4)
    view[:] = b"abcd"
    assert memory.read(0x2000, 4) == b"abcd"


def test_host_address_points_at_the_same_bytes(memory: GuestMemory) -> None:
    memory.write(4 * MIB + 0x10, b"xyz")
    pointer = memory.host_address(4 * MIB + 0x10, 3)
    assert ctypes.string_at(pointer, 3) == b"xyz"


@pytest.mark.parametrize(
    "gpa,length",
    [(2 * MIB, 1), (2 * MIB - 2, 4), (5 * MIB, 1), (3 * MIB, 8), (-1, 1), (0, -1), (1 << 64, 1), (4 * MIB - 1, 2)],
)
def test_accesses_outside_ram_are_refused(memory: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory.read(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            memory.write(gpa, b"\0" * length)
    with pytest.raises(GuestMemoryError):
        memory.host_address(gpa, length)


def test_split_breaks_accesses_at_region_boundaries() -> None:
    with GuestMemory.allocate([MemoryRange(0, MIB), MemoryRange(MIB, MIB)]) as mem:
        assert list(mem.split(MIB - 16, 32)) == [(MIB - 16, 16), (MIB, 16)]
        with pytest.raises(GuestMemoryError):
            list(mem.split(2 * MIB - 8, 16))


def test_overlapping_or_unaligned_regions_are_refused() -> None:
    with pytest.raises(GuestMemoryError, match="page aligned"):
        GuestMemory.allocate([MemoryRange(0, 1000)])
    with pytest.raises(GuestMemoryError, match="overlaps"):
        GuestMemory.allocate([MemoryRange(0, MIB), MemoryRange(MIB // 2, MIB)])


def test_shared_memory_is_backed_by_a_memfd() -> None:
    with GuestMemory.allocate([MemoryRange(0, MIB)], shared=True) as mem:
        region = mem.regions[0]
        assert region.fd is not None
        mem.write(0x100, b"shared")
        assert __import__("os").pread(region.fd, 6, 0x100) == b"shared"


@pytest.mark.parametrize("shared", [False, True], ids=["private", "memfd"])
def test_a_discarded_region_reads_as_zeros_and_holds_no_pages(shared: bool) -> None:
    """What a reboot does to RAM: a memfd's pages must be punched out, not just unmapped."""
    with GuestMemory.allocate([MemoryRange(0, MIB)], shared=shared) as mem:
        region = mem.regions[0]
        mem.write(0x2000, b"stale")
        region.discard()
        if region.fd is not None:
            assert os.fstat(region.fd).st_blocks == 0
        assert mem.read(0x2000, 5) == b"\0" * 5


@pytest.mark.parametrize("shared", [False, True], ids=["private", "memfd"])
def test_discarding_a_range_frees_only_that_range(shared: bool) -> None:
    """virtio-mem's unplug and the balloon: on a memfd the range must leave the file, not only
    the mapping (with MADV_DONTNEED alone the unplugged pages stayed in the memfd, read back)."""
    with GuestMemory.allocate([MemoryRange(0x100000, 4 * MIB)], shared=shared) as mem:
        mem.fill(0x100000, 4 * MIB, 0xAA)
        mem.discard(0x100000 + MIB, 2 * MIB)
        region = mem.regions[0]
        if region.fd is not None:  # before reading: a read fault on a memfd hole allocates a page
            assert os.fstat(region.fd).st_blocks * 512 == 2 * MIB
        assert mem.read(0x100000 + MIB, 16) == bytes(16)
        assert mem.read(0x100000 + 3 * MIB - 16, 16) == bytes(16)
        assert mem.read(0x100000 + MIB - 1, 1) == b"\xaa"
        assert mem.read(0x100000 + 3 * MIB, 1) == b"\xaa"
        with pytest.raises(GuestMemoryError):
            region.discard(3 * MIB, 2 * MIB)  # past the region's end


@given(st.integers(-(1 << 65), 1 << 65), st.integers(-10, 1 << 22))
def test_random_accesses_either_succeed_inside_ram_or_raise(gpa: int, length: int) -> None:
    with GuestMemory.allocate([MemoryRange(0x10000, 0x10000)]) as mem:
        inside = gpa >= 0x10000 and length >= 0 and gpa + length <= 0x20000
        try:
            data = mem.read(gpa, length)
        except GuestMemoryError:
            assert not inside
        else:
            assert inside and len(data) == length
