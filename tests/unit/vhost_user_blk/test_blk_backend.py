"""``vmmkit-vhost-user blk`` as a process, over a real Unix socket, a memfd as guest memory and
eventfds, driven by blk_frontend.py: the requests, the configuration space, read-only images,
out-of-range sectors, the in-flight record a restarted backend resubmits from (written here as a
dead backend would have left it, in the spec's layout), and hostile chains (hypothesis) that
must fail the request or stop the ring, never the daemon. QEMU and vmmkit are the frontends in
tests/integration/test_vhost_user_blk_backend.py."""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blk_frontend import (
    DESC_NEXT,
    DESC_WRITE,
    MEM_SIZE,
    QSIZE,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkFrontend,
    Daemon,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req

SECTORS = 64
SIZE = SECTORS * 512
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14
VIRTIO_BLK_F_DISCARD = 1 << 13
# vhost-user.rst, "Inflight I/O tracking": QueueRegionSplit and DescStateSplit.
REGION_HEADER = struct.Struct("=QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("=B5xHQ")  # inflight, padding, next, counter


def _short(tmp_path: Path, name: str) -> Path:
    path = Path("/tmp") / f"vublk-{os.getpid()}-{tmp_path.name[-16:]}-{name}"
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return path


@pytest.fixture
def daemon(tmp_path: Path, image: Path) -> Iterator[Daemon]:
    served = Daemon(_short(tmp_path, "blk.sock"), image, "--serial", "vu-serial-1")
    try:
        yield served
    finally:
        assert served.alive(), served.log.read_text()
        log = served.stop()
        assert "Traceback" not in log, log


@pytest.fixture
def frontend(daemon: Daemon) -> Iterator[BlkFrontend]:
    front = BlkFrontend(daemon.socket)
    try:
        yield front
    finally:
        front.close()


def test_requests_and_config_space(frontend: BlkFrontend, image: Path) -> None:
    offered = frontend.handshake(features=VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_WRITE_ZEROES | VIRTIO_BLK_F_DISCARD)
    assert offered & VIRTIO_BLK_F_FLUSH and offered & VIRTIO_BLK_F_WRITE_ZEROES and not offered & VIRTIO_BLK_F_RO
    config = vu.ConfigSpace.unpack(frontend.get(Req.GET_CONFIG, vu.ConfigSpace(0, 24, 0, bytes(24)).pack())).payload
    capacity, _size_max, seg_max = struct.unpack_from("<QII", config)
    blk_size = struct.unpack_from("<I", config, 20)[0]
    assert (capacity, seg_max, blk_size) == (SECTORS, 126, 512)
    assert frontend.start_ring() == 0
    pattern = bytes((i * 7) & 0xFF for i in range(1024))
    frontend.make_available(frontend.chain(0, T_OUT, 4, 1024, data=pattern))
    frontend.wait_used(1)
    frontend.make_available(frontend.chain(1, T_IN, 4, 1024))
    frontend.wait_used(2)
    frontend.make_available(frontend.chain(2, T_GET_ID, 0, 20))
    frontend.wait_used(3)
    frontend.make_available(frontend.chain(3, T_FLUSH, 0, 0))
    frontend.wait_used(4)
    assert [frontend.status(slot) for slot in range(4)] == [S_OK] * 4
    assert frontend.data(1, 1024) == pattern
    assert frontend.used(1) == (3, 1025) and frontend.used(2) == (6, 21)
    assert frontend.data(2, 20) == b"vu-serial-1".ljust(20, b"\0")
    assert image.read_bytes()[4 * 512:4 * 512 + 1024] == pattern
    # Past the end, a partial sector, an unknown type: errors with a status, nothing written.
    frontend.make_available(frontend.chain(0, T_OUT, SECTORS - 1, 1024, data=pattern))
    frontend.make_available(frontend.chain(1, T_IN, 0, 100))
    frontend.make_available(frontend.chain(2, 99, 0, 512))
    frontend.make_available(frontend.chain(3, T_IN, 2**64 - 1, 512))
    frontend.wait_used(8)
    assert [frontend.status(slot) for slot in range(4)] == [S_IOERR, S_IOERR, S_UNSUPP, S_IOERR]
    assert image.stat().st_size == SIZE
    # WRITE_ZEROES and DISCARD through their segments.
    frontend.make_available(frontend.chain(0, T_WRITE_ZEROES, 0, 16, data=struct.pack("<QII", 4, 2, 0)))
    frontend.wait_used(9)
    assert frontend.status(0) == S_OK and image.read_bytes()[4 * 512:6 * 512] == bytes(1024)
    frontend.make_available(frontend.chain(0, T_DISCARD, 0, 16, data=struct.pack("<QII", SECTORS, 1, 0)))
    frontend.wait_used(10)
    assert frontend.status(0) == S_IOERR


def test_a_read_only_image_refuses_writes(tmp_path: Path, image: Path) -> None:
    daemon = Daemon(_short(tmp_path, "ro.sock"), image, "--read-only")
    front = BlkFrontend(daemon.socket)
    try:
        assert front.handshake() & VIRTIO_BLK_F_RO
        assert front.start_ring() == 0
        before = image.read_bytes()
        front.make_available(front.chain(0, T_OUT, 0, 512, data=b"x" * 512))
        front.make_available(front.chain(1, T_WRITE_ZEROES, 0, 16, data=struct.pack("<QII", 0, 1, 0)))
        front.make_available(front.chain(2, T_IN, 0, 512))
        front.wait_used(3)
        assert [front.status(slot) for slot in range(3)] == [S_IOERR, S_UNSUPP, S_OK]
        assert image.read_bytes() == before and front.data(2, 512) == before[:512]
    finally:
        front.close()
        assert daemon.alive()
        daemon.stop()


def _region(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size)


def test_a_restarted_backend_resubmits_what_its_predecessor_had_taken(
    frontend: BlkFrontend, daemon: Daemon, image: Path
) -> None:
    """Requests A (slot 0) and B (slot 1) made available; the dead backend completed B first and
    had taken A: the buffer marks A in flight. The next backend serves A, and not B again, then
    takes new requests after both."""
    frontend.handshake(inflight=True, features=VIRTIO_BLK_F_FLUSH)
    info, fd = frontend.get_inflight()
    try:
        assert info.mmap_size >= REGION_HEADER.size + DESC_STATE.size * QSIZE and info.num_queues == 1
        assert frontend.set_inflight(info, fd) == 0
        assert frontend.start_ring() == 0
        frontend.make_available(frontend.chain(4, T_OUT, 0, 512, data=b"w" * 512))  # served normally
        frontend.wait_used(1)
        region = _region(fd, info.mmap_size)
        _features, version, desc_num, last_batch, used_idx = REGION_HEADER.unpack_from(region)
        assert (version, desc_num, last_batch, used_idx) == (1, QSIZE, 12, 1)
        assert DESC_STATE.unpack_from(region, REGION_HEADER.size + DESC_STATE.size * 12)[0] == 0
        frontend.close()  # the frontend goes: the daemon forgets the ring (as a restart would)

        again = BlkFrontend(daemon.socket)
        try:
            again.handshake(inflight=True, features=VIRTIO_BLK_F_FLUSH)
            # What the dead backend left: A (head 0) taken at counter 7 and in flight; B (head 3)
            # completed out of order (in the used ring); avail index 3, used index 2.
            a = again.chain(0, T_OUT, 8, 512, data=b"A" * 512)
            b = again.chain(1, T_OUT, 9, 512, data=b"B" * 512)
            for position, head in enumerate((12, a, b)):
                struct.pack_into("<H", again.mem, 0x1000 + 4 + 2 * position, head)
            struct.pack_into("<H", again.mem, 0x1000 + 2, 3)
            again.avail_idx = 3
            struct.pack_into("<II", again.mem, 0x2000 + 4, 12, 1)
            struct.pack_into("<II", again.mem, 0x2000 + 4 + 8, b, 1)
            struct.pack_into("<H", again.mem, 0x2000 + 2, 2)
            REGION_HEADER.pack_into(region, 0, 0, 1, QSIZE, b, 2)
            DESC_STATE.pack_into(region, REGION_HEADER.size + DESC_STATE.size * a, 1, 0, 7)
            again.mem[0x4000 + 1] = 0  # B's status, as completed
            assert again.set_inflight(info, fd) == 0
            assert again.start_ring(base=2) == 0
            again.wait_used(3)
            assert again.used(2) == (a, 1) and again.status(0) == S_OK
            assert image.read_bytes()[8 * 512:9 * 512] == b"A" * 512
            assert image.read_bytes()[9 * 512:10 * 512] != b"B" * 512  # B was not served again
            # New requests are taken after A and B (avail position 3).
            again.make_available(again.chain(2, T_IN, 8, 512))
            again.wait_used(4)
            assert again.used(3)[0] == 6 and again.data(2, 512) == b"A" * 512
            assert DESC_STATE.unpack_from(region, REGION_HEADER.size + DESC_STATE.size * a)[0] == 0
        finally:
            again.close()
        region.close()
    finally:
        os.close(fd)
    assert "resubmitting 1 chains" in daemon.log.read_text()


def test_the_last_batch_of_a_backend_that_died_publishing_it_is_not_resubmitted(
    frontend: BlkFrontend, daemon: Daemon, image: Path
) -> None:
    """The dead backend had published B's used element (used index 1) but not yet cleared B in
    the buffer (its used_idx says 0): B is done, not resubmitted."""
    frontend.handshake(inflight=True)
    info, fd = frontend.get_inflight()
    try:
        b = frontend.chain(1, T_OUT, 9, 512, data=b"B" * 512)
        struct.pack_into("<H", frontend.mem, 0x1000 + 4, b)
        struct.pack_into("<H", frontend.mem, 0x1000 + 2, 1)
        frontend.avail_idx = 1
        struct.pack_into("<II", frontend.mem, 0x2000 + 4, b, 1)
        struct.pack_into("<H", frontend.mem, 0x2000 + 2, 1)
        region = _region(fd, info.mmap_size)
        REGION_HEADER.pack_into(region, 0, 0, 1, QSIZE, b, 0)
        DESC_STATE.pack_into(region, REGION_HEADER.size + DESC_STATE.size * b, 1, 0, 3)
        assert frontend.set_inflight(info, fd) == 0
        assert frontend.start_ring(base=1) == 0
        frontend.make_available(frontend.chain(2, T_FLUSH, 0, 0))
        frontend.wait_used(2)
        assert frontend.used(1)[0] == 6 and frontend.used_idx() == 2
        assert REGION_HEADER.unpack_from(region)[4] == 2
        region.close()
    finally:
        os.close(fd)
    assert image.read_bytes()[9 * 512:10 * 512] != b"B" * 512
    assert "resubmitting" not in daemon.log.read_text()


def test_a_hostile_inflight_buffer_is_refused(frontend: BlkFrontend) -> None:
    frontend.handshake(inflight=True)
    info, fd = frontend.get_inflight()
    try:
        assert frontend.set_inflight(vu.Inflight(info.mmap_size * 100, 0, 1, QSIZE), fd) != 0  # beyond the file
        assert frontend.set_inflight(vu.Inflight(info.mmap_size, 0, 9, QSIZE), fd) != 0  # queues it lacks
        region = _region(fd, info.mmap_size)
        REGION_HEADER.pack_into(region, 0, 0, 1, QSIZE, 0, 0)
        DESC_STATE.pack_into(region, REGION_HEADER.size + DESC_STATE.size * 15, 1, 0, 1)  # head 15 of a ring of 8
        assert frontend.set_inflight(info, fd) == 0
        assert frontend.acked(Req.SET_VRING_NUM, vu.VringState(0, 8).pack()) == 0
        assert frontend.acked(Req.SET_VRING_ADDR, vu.VringAddress(0, 0, 0x7F00_0000_0000, 0x7F00_0000_2000,
                                                                  0x7F00_0000_1000).pack()) == 0
        assert frontend.acked(Req.SET_VRING_KICK, vu.pack_vring_file(0), [frontend.kick]) != 0
        region.close()
    finally:
        os.close(fd)
    assert vu.unpack_u64(frontend.get(Req.GET_FEATURES)) & (1 << 32)  # still talking


# -- hostile chains ---------------------------------------------------------------------------

_addresses = st.one_of(st.integers(0, MEM_SIZE + 4096), st.integers(0, 2**64 - 1),
                       st.sampled_from([MEM_SIZE - 1, MEM_SIZE - 16, 2**64 - 16]))
_lengths = st.one_of(st.integers(0, 0x20000), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 15, 16, 511, 513]))
_descriptor = st.tuples(_addresses, _lengths, st.integers(0, 7), st.integers(0, QSIZE + 2))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(_descriptor, min_size=1, max_size=5), kind=st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID,
                                                                                 T_DISCARD, T_WRITE_ZEROES, 7]),
       sector=st.one_of(st.integers(0, SECTORS + 2), st.integers(0, 2**64 - 1)), head=st.integers(0, QSIZE + 1))
def test_hostile_chains_fail_the_request_or_the_ring_never_the_daemon(
    daemon: Daemon, image: Path, descs: list[tuple[int, int, int, int]], kind: int, sector: int, head: int
) -> None:
    front = BlkFrontend(daemon.socket)
    try:
        front.handshake(features=VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_WRITE_ZEROES | VIRTIO_BLK_F_DISCARD)
        assert front.start_ring() == 0
        struct.pack_into("<IIQ", front.mem, 0x3000, kind, 0, sector)
        for index, (address, length, flags, nxt) in enumerate(descs):
            front.raw_desc(index, address, length, flags & (DESC_NEXT | DESC_WRITE | 4), nxt)
        front.make_available(head)
        # Either the request completes (with a status where it had a status byte) or the ring stops.
        for _ in range(200):
            if front.used_idx() or front.ring_stopped():
                break
            time.sleep(0.005)
        assert front.used_idx() <= 1
        # The daemon still answers, and the image has not grown.
        assert vu.unpack_u64(front.get(Req.GET_FEATURES)) & (1 << 32)
        assert image.stat().st_size == SIZE
    finally:
        front.close()
    assert daemon.alive(), daemon.log.read_text()
