"""The vhost-user backend side of vmmkit-vhost-user fs over a real Unix socket, a memfd as
guest memory and eventfds, driven by a small frontend written here with the core's codec
(:mod:`vmmkit.vhost_user.protocol`): the message flow QEMU follows, then hostile frontends and
hostile rings. (QEMU itself is the judge in tests/integration/test_vhost_user_fs_qemu.py.)"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.backend import F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, Backend
from vmmkit_vhost_user.fs import VirtioFs

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req

MEM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000  #: where the "frontend" says it has guest memory
QSIZE = 8
DESC, AVAIL, USED, BUFFERS = 0x0, 0x1000, 0x2000, 0x10000
REQUEST_QUEUE = 1


class Frontend:
    """A vhost-user frontend with one memfd region and one request ring (queue 1)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = os.eventfd(0)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_seen = 0

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.kick, self.call, self.err):
            os.close(fd)

    def request(self, request: int, payload: bytes = b"", fds: list[int] | None = None, *,
                ack: bool = False) -> vu.Message | None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if ack else 0)
        vu.send(self.sock, vu.Message(request, payload, flags), fds or [])
        if ack or request in (Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE,
                              Req.GET_QUEUE_NUM, Req.GET_CONFIG):
            reply, got = vu.recv(self.sock)
            assert not got and reply.is_reply and reply.request == request
            return reply
        return None

    def acked(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        reply = self.request(request, payload, fds, ack=True)
        assert reply is not None
        return vu.unpack_u64(reply.payload)

    def handshake(self) -> None:
        features = vu.unpack_u64(self._get(Req.GET_FEATURES))
        assert features & VIRTIO_F_VERSION_1 and features & F_PROTOCOL_FEATURES
        protocol = vu.unpack_u64(self._get(Req.GET_PROTOCOL_FEATURES))
        assert protocol & vu.protocol_mask(vu.ProtocolFeature.REPLY_ACK, vu.ProtocolFeature.MQ)
        self.request(Req.SET_PROTOCOL_FEATURES, vu.pack_u64(vu.protocol_mask(vu.ProtocolFeature.REPLY_ACK)))
        assert vu.unpack_u64(self._get(Req.GET_QUEUE_NUM)) == 2
        assert self.acked(Req.SET_OWNER) == 0
        assert self.acked(Req.SET_FEATURES, vu.pack_u64(VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES)) == 0
        region = vu.MemoryRegion(0, MEM_SIZE, UVA, 0)
        assert self.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([region]), [self.memfd]) == 0

    def start_ring(self, index: int = REQUEST_QUEUE, *, desc: int = DESC) -> int:
        results = [
            self.acked(Req.SET_VRING_NUM, vu.VringState(index, QSIZE).pack()),
            self.acked(Req.SET_VRING_ADDR, vu.VringAddress(index, 0, UVA + desc, UVA + USED, UVA + AVAIL).pack()),
            self.acked(Req.SET_VRING_BASE, vu.VringState(index, 0).pack()),
            self.acked(Req.SET_VRING_CALL, vu.pack_vring_file(index), [self.call]),
            self.acked(Req.SET_VRING_ERR, vu.pack_vring_file(index), [self.err]),
            self.acked(Req.SET_VRING_KICK, vu.pack_vring_file(index), [self.kick]),
            self.acked(Req.SET_VRING_ENABLE, vu.VringState(index, 1).pack()),
        ]
        return max(results)

    def _get(self, request: int) -> bytes:
        reply = self.request(request)
        assert reply is not None
        return reply.payload

    def submit(self, request: bytes, room: int, *, address: int = BUFFERS) -> None:
        """Put one FUSE request (a readable and a writable descriptor) on the ring and kick."""
        inside = request[:max(0, MEM_SIZE - address)]  # a hostile buffer may run off the end
        self.mem[address:address + len(inside)] = inside
        head = (self.avail_idx * 2) % QSIZE
        struct.pack_into("<QIHH", self.mem, DESC + 16 * head, address, len(request), 1, head + 1)
        struct.pack_into("<QIHH", self.mem, DESC + 16 * (head + 1), address + 0x8000, room, 2, 0)
        struct.pack_into("<H", self.mem, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def wait_used(self, timeout: float = 10) -> tuple[int, bytes]:
        """(written, reply) of the next used element, after the call eventfd fired."""
        ready, _, _ = select.select([self.call], [], [], timeout)
        assert ready, "no used-buffer notification"
        os.eventfd_read(self.call)
        used_idx = struct.unpack_from("<H", self.mem, USED + 2)[0]
        assert used_idx == self.used_seen + 1
        head, written = struct.unpack_from("<II", self.mem, USED + 4 + 8 * (self.used_seen % QSIZE))
        self.used_seen += 1
        address = struct.unpack_from("<Q", self.mem, DESC + 16 * (head + 1))[0]
        return written, bytes(self.mem[address:address + written])


def fuse_init(unique: int = 2) -> bytes:
    body = struct.pack("<IIII", 7, 38, 0, 0) + bytes(48)
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), fuse.Opcode.INIT, unique, 0, 0, 0, 0, 0, 0) + body


@pytest.fixture(params=[0, 3], ids=["inline", "pool"])
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Backend, Path, Path]]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    path = Path("/tmp") / f"vu-test-{os.getpid()}-{threading.get_ident() % 10000}.sock"
    backend = Backend(VirtioFs(str(share), tag="myfs"), str(path), thread_pool_size=request.param)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend, path, share
    finally:
        backend.stop()
        thread.join(10)
        backend.close()
        path.unlink(missing_ok=True)


def test_a_request_travels_through_the_ring(served: tuple[Backend, Path, Path]) -> None:
    _backend, path, _share = served
    frontend = Frontend(path)
    try:
        frontend.handshake()
        assert frontend.start_ring() == 0
        frontend.submit(fuse_init(unique=42), room=4096)
        written, reply = frontend.wait_used()
        length, error, unique = fuse.OUT_HEADER.unpack_from(reply)
        assert (written, length, error, unique) == (16 + 64, 16 + 64, 0, 42)
        assert struct.unpack_from("<II", reply, 16) == (7, fuse.KERNEL_MINOR_VERSION)
        # GET_VRING_BASE stops the ring and answers where the backend is.
        reply_msg = frontend.request(Req.GET_VRING_BASE, vu.VringState(REQUEST_QUEUE, 0).pack())
        assert reply_msg is not None and vu.VringState.unpack(reply_msg.payload) == vu.VringState(1, 1)
    finally:
        frontend.close()


def test_config_space_carries_the_tag(served: tuple[Backend, Path, Path]) -> None:
    _backend, path, _share = served
    frontend = Frontend(path)
    try:
        reply = frontend.request(Req.GET_CONFIG, vu.ConfigSpace(0, 40, 0, bytes(40)).pack())
        assert reply is not None
        config = vu.ConfigSpace.unpack(reply.payload)
        assert config.payload == b"myfs".ljust(36, b"\0") + struct.pack("<I", 1)
    finally:
        frontend.close()


def test_hostile_memory_tables_and_rings_are_refused(served: tuple[Backend, Path, Path]) -> None:
    backend, path, _share = served
    frontend = Frontend(path)
    try:
        frontend.handshake()
        # A region past the end of its memfd (touching it would SIGBUS the daemon).
        beyond = vu.MemoryRegion(0, 2 * MEM_SIZE, UVA, 0)
        assert frontend.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([beyond]), [frontend.memfd]) != 0
        unaligned = vu.MemoryRegion(0, MEM_SIZE - 4096, UVA, 100)
        assert frontend.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([unaligned]), [frontend.memfd]) != 0
        # A region without its descriptor; a pipe instead of memory.
        assert frontend.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([vu.MemoryRegion(0, 4096, UVA)])) != 0
        r, w = os.pipe()
        assert frontend.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([vu.MemoryRegion(0, 4096, UVA)]), [r]) != 0
        os.close(r)
        os.close(w)
        # Rings: a queue that does not exist, a size that is not a power of two, rings outside
        # the memory table, a descriptor on a request that takes none.
        assert frontend.acked(Req.SET_VRING_NUM, vu.VringState(7, QSIZE).pack()) != 0
        assert frontend.acked(Req.SET_VRING_NUM, vu.VringState(1, 12).pack()) != 0
        assert frontend.start_ring(desc=MEM_SIZE - 16) != 0  # the table runs past the region
        assert frontend.acked(Req.GET_FEATURES, b"", [frontend.call]) != 0
        assert frontend.acked(Req.SET_FEATURES, vu.pack_u64(1 << 60)) != 0
        assert frontend.start_ring() == 0  # the frontend may still get it right
        frontend.submit(fuse_init(), room=4096)
        assert fuse.OUT_HEADER.unpack_from(frontend.wait_used()[1])[1] == 0
        assert backend.frontends_served == 1
    finally:
        frontend.close()


def test_a_chain_outside_guest_memory_stops_the_ring_and_signals_err(served: tuple[Backend, Path, Path]) -> None:
    backend, path, _share = served
    frontend = Frontend(path)
    try:
        frontend.handshake()
        assert frontend.start_ring() == 0
        frontend.submit(fuse_init(), room=4096, address=MEM_SIZE - 8)  # buffer runs off the end
        ready, _, _ = select.select([frontend.err], [], [], 10)
        assert ready, "no error notification"
        assert struct.unpack_from("<H", frontend.mem, USED + 2)[0] == 0  # nothing used
        # The daemon lives on: another frontend is served after this one leaves.
    finally:
        frontend.close()
    second = Frontend(path)
    try:
        second.handshake()
        assert second.start_ring() == 0
        second.submit(fuse_init(), room=4096)
        assert fuse.OUT_HEADER.unpack_from(second.wait_used()[1])[1] == 0
        assert backend.frontends_served == 2
    finally:
        second.close()


def test_a_reply_larger_than_the_room_becomes_an_error(served: tuple[Backend, Path, Path]) -> None:
    _backend, path, _share = served
    frontend = Frontend(path)
    try:
        frontend.handshake()
        assert frontend.start_ring() == 0
        frontend.submit(fuse_init(), room=20)  # INIT's reply needs 80 bytes
        written, reply = frontend.wait_used()
        assert written == 16 and fuse.OUT_HEADER.unpack_from(reply)[1] == -errno.ERANGE
    finally:
        frontend.close()


def test_a_frontend_that_breaks_the_protocol_is_dropped_and_the_next_one_served(
        served: tuple[Backend, Path, Path]) -> None:
    backend, path, _share = served
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(str(path))
    bad.sendall(struct.pack("=III", 1, 0x2, 0))  # version 2
    bad.settimeout(10)
    assert bad.recv(16) == b""  # the backend hung up
    bad.close()
    frontend = Frontend(path)
    try:
        frontend.handshake()
        assert backend.frontends_served == 2
    finally:
        frontend.close()


def test_a_memory_table_sent_again_moves_the_running_ring(served: tuple[Backend, Path, Path]) -> None:
    _backend, path, _share = served
    frontend = Frontend(path)
    try:
        frontend.handshake()
        assert frontend.start_ring() == 0
        frontend.submit(fuse_init(unique=2), room=4096)
        assert fuse.OUT_HEADER.unpack_from(frontend.wait_used()[1])[2] == 2
        # Memory hotplug: the same memory at the same place, plus a second region.
        extra = os.memfd_create("more")
        os.ftruncate(extra, MEM_SIZE)
        table = vu.pack_memory_table([vu.MemoryRegion(0, MEM_SIZE, UVA), vu.MemoryRegion(4 * MEM_SIZE, MEM_SIZE,
                                                                                        UVA + 4 * MEM_SIZE)])
        assert frontend.acked(Req.SET_MEM_TABLE, table, [frontend.memfd, extra]) == 0
        os.close(extra)
        frontend.submit(fuse_init(unique=4), room=4096)
        assert fuse.OUT_HEADER.unpack_from(frontend.wait_used()[1])[2] == 4
        # A table that overlaps itself is refused; the ring keeps the one it has.
        overlapping = vu.pack_memory_table([vu.MemoryRegion(0, MEM_SIZE, UVA), vu.MemoryRegion(4096, 4096, UVA * 2)])
        assert frontend.acked(Req.SET_MEM_TABLE, overlapping, [frontend.memfd, frontend.memfd]) != 0
        frontend.submit(fuse_init(unique=6), room=4096)
        assert fuse.OUT_HEADER.unpack_from(frontend.wait_used()[1])[2] == 6
    finally:
        frontend.close()
