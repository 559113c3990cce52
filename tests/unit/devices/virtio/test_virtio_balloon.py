"""virtio-balloon driven by the fake driver over real guest memory: the configuration space, the
target and its configuration interrupt, inflation giving pages back to the host (checked with
``mincore`` on private memory and the memfd's allocated blocks on shared memory), deflation,
free page reporting, and hostile page frame numbers (fuzzed) that must fail the device without
releasing anything or touching memory outside guest RAM."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import Harness, guarded_memory, wait_for
from vmmkit_devices.virtio.balloon import (
    BALLOON_PAGE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonDevice,
    VirtioBalloonType,
)

from vmmkit.config import BalloonConfig, MemoryConfig, VmConfig
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, VirtioInterruptType

MIB = 1 << 20
#: Where the tests put the pages they balloon: above the fake driver's rings and buffers.
POOL = 8 * MIB

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(memory: GuestMemory, gpa: int, pages: int) -> list[bool]:
    """Which of the host pages behind ``gpa`` are resident (``mincore``)."""
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(ctypes.c_void_p(memory.host_address(gpa)), pages * BALLOON_PAGE, vec) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return [bool(byte & 1) for byte in vec.raw]


def pfn_array(gpas: list[int]) -> bytes:
    return struct.pack(f"<{len(gpas)}I", *(gpa >> 12 for gpa in gpas))


def submit_pfns(h: Harness, queue: int, gpas: list[int], *, writable: bool = False) -> None:
    data = pfn_array(gpas)
    h.submit(queue, [(h.alloc(max(len(data), 4), data=data), len(data), writable)])


def fill_pages(memory: GuestMemory, gpa: int, pages: int) -> None:
    for page in range(pages):
        memory.fill(gpa + page * BALLOON_PAGE, BALLOON_PAGE, 0x5A)


def test_features_queues_and_configuration() -> None:
    plain = BalloonDevice("__balloon", 3 * MIB)
    assert plain.features() & VIRTIO_F_VERSION_1
    assert not plain.features() & (VIRTIO_BALLOON_F_DEFLATE_ON_OOM | VIRTIO_BALLOON_F_REPORTING)
    assert len(plain.queue_max_sizes) == 2
    assert struct.unpack("<IIII", plain.config_space()) == (3 * MIB // 4096, 0, 0, 0)
    full = BalloonDevice("b", 0, deflate_on_oom=True, free_page_reporting=True)
    assert full.features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM and full.features() & VIRTIO_BALLOON_F_REPORTING
    assert len(full.queue_max_sizes) == 3 and full.queue_max_sizes[2] >= 32  # Linux needs 32


def test_actual_is_written_by_the_driver_and_nothing_else() -> None:
    device = BalloonDevice("b", MIB)
    device.write_config(4, struct.pack("<I", 77))
    device.write_config(0, struct.pack("<I", 1))  # num_pages is the device's
    device.write_config(12, struct.pack("<I", 9))  # poison_val: not offered
    assert struct.unpack("<II", device.read_config(0, 8)) == (256, 77)
    device.write_config(5, b"\x01")  # a byte write inside actual
    assert device.actual == 77 + 256
    assert device.counters()["actual_pages"] == 77 + 256 and device.counters()["target_pages"] == 256


def test_resize_sets_the_target_and_interrupts(activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", 0)
    h = activate(device)
    device.resize(6 * MIB + 100)
    assert struct.unpack_from("<I", device.config_space())[0] == 6 * MIB // 4096
    assert h.interrupt.count(VirtioInterruptType.CONFIG) == 1
    device.pause()
    device.resize(MIB)  # told at resume, not while paused
    assert h.interrupt.count(VirtioInterruptType.CONFIG) == 1
    device.resume()
    assert h.interrupt.count(VirtioInterruptType.CONFIG) == 2
    assert struct.unpack_from("<I", device.config_space())[0] == MIB // 4096


def test_inflate_gives_pages_back_and_deflate_takes_them(activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", 4 * BALLOON_PAGE)
    h = activate(device)
    fill_pages(h.memory, POOL, 6)
    assert all(resident(h.memory, POOL, 6))
    inflated = [POOL + BALLOON_PAGE * i for i in (0, 1, 2, 4)]  # page 3 and 5 stay in use
    submit_pfns(h, 0, inflated)
    assert [length for _, length in h.wait_used(0)] == [0]
    assert resident(h.memory, POOL, 6) == [False, False, False, True, False, True]
    assert h.memory.read(POOL + 3 * BALLOON_PAGE, BALLOON_PAGE) == b"\x5a" * BALLOON_PAGE
    assert h.memory.read(POOL, BALLOON_PAGE) == bytes(BALLOON_PAGE)  # the guest reads zeros
    counters = device.counters()
    assert counters["inflated_pages"] == 4 and counters["released_bytes"] == 4 * BALLOON_PAGE
    submit_pfns(h, 1, inflated[:2])
    h.wait_used(1)
    assert device.counters()["deflated_pages"] == 2
    assert h.interrupt.count(queue=0) >= 1 and h.interrupt.count(queue=1) >= 1
    assert device.broken is None


def test_shared_memory_is_punched(event_loop: EventLoop) -> None:
    with GuestMemory.allocate([MemoryRange(0, 16 * MIB)], shared=True) as memory:
        (region,) = memory.regions
        assert region.fd is not None
        fill_pages(memory, POOL, 65)  # the 65th stays
        assert os.lseek(region.fd, POOL, os.SEEK_DATA) == POOL
        h = Harness(BalloonDevice("__balloon", MIB), memory, event_loop).activate()
        try:
            submit_pfns(h, 0, [POOL + BALLOON_PAGE * i for i in range(64)])
            h.wait_used(0)
            assert os.lseek(region.fd, POOL, os.SEEK_HOLE) == POOL  # the pages left the memfd
            assert os.lseek(region.fd, POOL, os.SEEK_DATA) == POOL + 64 * BALLOON_PAGE
            assert memory.read(POOL, 64 * BALLOON_PAGE) == bytes(64 * BALLOON_PAGE)
        finally:
            h.close()
            h.device.close()


def test_no_release_on_huge_pages_is_counted(activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", MIB, release=False)
    h = activate(device)
    fill_pages(h.memory, POOL, 2)
    submit_pfns(h, 0, [POOL, POOL + BALLOON_PAGE])
    h.wait_used(0)
    assert h.memory.read(POOL, BALLOON_PAGE) == b"\x5a" * BALLOON_PAGE
    assert device.counters()["unreleased_bytes"] == 2 * BALLOON_PAGE
    assert device.counters()["released_bytes"] == 0


def test_free_page_reporting_releases_the_reported_ranges(activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", 0, free_page_reporting=True)
    h = activate(device)
    fill_pages(h.memory, POOL, 8)
    # A 16 KiB range and an unaligned one whose partial pages must be kept.
    h.submit(2, [(POOL, 4 * BALLOON_PAGE, True), (POOL + 5 * BALLOON_PAGE + 8, 2 * BALLOON_PAGE, True)])
    h.wait_used(2)
    assert resident(h.memory, POOL, 8) == [False] * 4 + [True, True, False, True]
    counters = device.counters()
    assert counters["reported_bytes"] == 6 * BALLOON_PAGE and counters["released_bytes"] == 5 * BALLOON_PAGE
    h.submit(2, [(h.alloc(16), 16, False)])  # a readable report is garbage
    wait_for(lambda: device.broken is not None, what="the device to fail")


# -- hostile page frame numbers ----------------------------------------------------------------

#: Two adjacent regions, a hole, a third; guard pages around each (touching one kills the test).
LAYOUT = [(0, 10 * MIB), (10 * MIB, MIB), (12 * MIB, MIB)]
HOLE = 11 * MIB
END = 13 * MIB


@pytest.fixture
def guarded() -> Iterator[GuestMemory]:
    with guarded_memory(LAYOUT) as memory:
        yield memory


@pytest.mark.parametrize("bad", [HOLE, HOLE + MIB - BALLOON_PAGE, END, 0xFFFF_FFFF << 12])
def test_a_page_outside_ram_fails_the_device_and_releases_nothing(
        bad: int, guarded: GuestMemory, activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", MIB)
    h = activate(device, memory=guarded)
    fill_pages(guarded, POOL, 1)
    submit_pfns(h, 0, [POOL, bad])
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert h.errors and "not in guest RAM" in str(h.errors[0])
    assert guarded.read(POOL, BALLOON_PAGE) == b"\x5a" * BALLOON_PAGE  # the valid page was kept
    assert device.counters()["released_bytes"] == 0
    # a reset brings it back
    h.close()
    fresh = activate(device, memory=guarded)
    submit_pfns(fresh, 0, [POOL, 10 * MIB + BALLOON_PAGE, 12 * MIB])  # all three regions
    fresh.wait_used(0)
    assert device.counters()["released_bytes"] == 3 * BALLOON_PAGE


@pytest.mark.parametrize("case", ["odd-length", "writable", "deflate-odd-length", "too-long"])
def test_malformed_arrays_fail_the_device(case: str, activate: Callable[..., Harness]) -> None:
    device = BalloonDevice("__balloon", MIB)
    h = activate(device)
    if case == "writable":
        submit_pfns(h, 0, [POOL], writable=True)
    elif case == "too-long":  # 16 MiB of "page frame numbers": refused before it is read
        h.submit(0, [(0, 8 * MIB, False), (8 * MIB, 8 * MIB, False)])
    else:
        h.submit(1 if case.startswith("deflate") else 0, [(h.alloc(6, data=b"\0" * 6), 6, False)])
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert device.counters()["released_bytes"] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pfns=st.lists(st.one_of(st.integers(POOL >> 12, END >> 12), st.integers(END >> 12, 0xFFFF_FFFF)),
                     min_size=1, max_size=64),
       queue=st.sampled_from([0, 1]))
def test_fuzzed_page_frame_arrays(pfns: list[int], queue: int, event_loop: EventLoop) -> None:
    """Any array (pages above the fake driver's rings, in RAM, in the hole, past the end):
    either every page is in RAM and, inflating, exactly those pages are released, or the device
    fails and releases nothing; the process survives (guard pages around RAM)."""
    with guarded_memory(LAYOUT) as memory:
        device = BalloonDevice("__balloon", MIB)
        h = Harness(device, memory, event_loop).activate()
        try:
            in_ram = sorted({p for p in pfns if memory.is_valid(p << 12, BALLOON_PAGE)})
            for pfn in in_ram:
                memory.fill(pfn << 12, BALLOON_PAGE, 0x5A)
            data = struct.pack(f"<{len(pfns)}I", *pfns)
            h.submit(queue, [(h.alloc(len(data), data=data), len(data), False)])
            if len(in_ram) == len(set(pfns)):
                h.wait_used(queue)
                assert device.broken is None
                released = len(pfns) * BALLOON_PAGE if queue == 0 else 0
                assert device.counters()["released_bytes"] == released
                expected = bytes(8) if queue == 0 else b"\x5a" * 8
            else:
                wait_for(lambda: device.broken is not None, what="the device to fail")
                assert device.counters()["released_bytes"] == 0
                expected = b"\x5a" * 8
            assert all(memory.read(pfn << 12, 8) == expected for pfn in in_ram)
        finally:
            h.close()
            device.close()


# -- the device type -----------------------------------------------------------------------------


def test_requested_only_with_a_balloon() -> None:
    assert VirtioBalloonType.requests(VmConfig()) == []
    config = VmConfig(memory=MemoryConfig(size=64 * MIB), balloon=BalloonConfig(size=MIB, deflate_on_oom=True))
    (request,) = VirtioBalloonType.requests(config)
    assert (request.type, request.id, request.config.deflate_on_oom) == ("virtio-balloon", "__balloon", True)
    named = VmConfig(memory=MemoryConfig(size=64 * MIB), balloon=BalloonConfig(size=MIB, id="bal"))
    assert VirtioBalloonType.requests(named)[0].id == "bal"
    assert mmap.PAGESIZE == BALLOON_PAGE  # the hosts this runs on
