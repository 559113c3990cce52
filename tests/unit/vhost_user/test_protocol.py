"""The vhost-user wire protocol over a real socketpair with real descriptors (memfds), and its
refusal of malformed messages (a peer is hostile input)."""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from vmmkit.vhost_user import protocol as p


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_numbers_match_the_spec() -> None:
    # docs/interop/vhost-user.rst, "Front-end message types" / "Protocol features".
    assert int(p.FrontendRequest.SET_MEM_TABLE) == 5
    assert int(p.FrontendRequest.GET_VRING_BASE) == 11
    assert int(p.FrontendRequest.SET_VRING_ENABLE) == 18
    assert int(p.FrontendRequest.GET_CONFIG) == 24
    assert int(p.FrontendRequest.GET_INFLIGHT_FD) == 31
    assert int(p.FrontendRequest.ADD_MEM_REG) == 37
    assert int(p.FrontendRequest.GET_STATUS) == 40
    assert int(p.BackendRequest.CONFIG_CHANGE_MSG) == 2
    assert int(p.BackendRequest.VRING_CALL) == 4
    assert int(p.ProtocolFeature.REPLY_ACK) == 3
    assert int(p.ProtocolFeature.CONFIG) == 9
    assert int(p.ProtocolFeature.INFLIGHT_SHMFD) == 12
    assert int(p.ProtocolFeature.CONFIGURE_MEM_SLOTS) == 15
    assert int(p.ProtocolFeature.STATUS) == 16
    assert p.F_PROTOCOL_FEATURES == 30
    assert (p.VERSION, p.FLAG_REPLY, p.FLAG_NEED_REPLY) == (0x1, 0x4, 0x8)
    assert p.protocol_mask(p.ProtocolFeature.MQ, p.ProtocolFeature.CONFIG) == 0x201
    # Sizes of the C structs (QEMU's VhostUserMsg union members).
    assert p.HEADER_SIZE == 12
    assert p.VringAddress.SIZE == 40
    assert p.MemoryRegion.SIZE == 32
    assert p.Inflight.SIZE == 24


def test_header_bytes_are_native_u32s() -> None:
    msg = p.Message(p.FrontendRequest.SET_VRING_NUM, p.VringState(1, 256).pack(), p.VERSION | p.FLAG_NEED_REPLY)
    assert msg.encode() == struct.pack("=IIIII", 8, 0x9, 8, 1, 256)
    assert p.unpack_header(msg.encode()[:12]) == p.Header(8, 0x9, 8)
    assert msg.need_reply and not msg.is_reply
    assert msg.reply(b"x").flags == p.VERSION | p.FLAG_REPLY


def test_payload_round_trips() -> None:
    assert p.unpack_u64(p.pack_u64(2**64 - 1)) == 2**64 - 1
    assert p.unpack_vring_file(p.pack_vring_file(3)) == (3, False)
    assert p.unpack_vring_file(p.pack_vring_file(255, no_fd=True)) == (255, True)
    assert p.VringState.unpack(p.VringState(2, 7).pack()) == p.VringState(2, 7)
    addr = p.VringAddress(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert p.VringAddress.unpack(addr.pack()) == addr
    regions = [p.MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0), p.MemoryRegion(1 << 32, 4096, 0x7E00_0000_0000, 8192)]
    assert p.unpack_memory_table(p.pack_memory_table(regions)) == regions
    assert p.unpack_single_region(p.pack_single_region(regions[1])) == regions[1]
    config = p.ConfigSpace(0, 60, 0, bytes(range(60)))
    assert p.ConfigSpace.unpack(config.pack()) == config
    inflight = p.Inflight(4096, 0, 2, 128)
    assert p.Inflight.unpack(inflight.pack()) == inflight
    assert p.Log.unpack(p.Log(4096, 16).pack()) == p.Log(4096, 16)


def test_memory_table_padded_to_eight_regions_as_qemu_sends_it() -> None:
    region = p.MemoryRegion(0, 1 << 20, 0x1000, 0)
    padded = struct.pack("=II", 1, 0) + region.pack() + bytes(7 * 32)
    assert p.unpack_memory_table(padded) == [region]


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("=II", 0, 0),  # no region
        struct.pack("=II", 9, 0) + bytes(9 * 32),  # more than 8
        struct.pack("=II", 2, 0) + p.MemoryRegion(0, 4096, 0, 0).pack(),  # count says 2, carries 1
        struct.pack("=II", 1, 0) + p.MemoryRegion(0, 0, 0, 0).pack(),  # empty region
        struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 2**64 - 4096, 8192, 0, 0),  # wraps
        b"\x01",
    ],
)
def test_bad_memory_tables_are_refused(payload: bytes) -> None:
    with pytest.raises(p.VhostUserProtocolError):
        p.unpack_memory_table(payload)


def test_payload_lengths_are_exact() -> None:
    for unpack, good in [
        (p.unpack_u64, 8),
        (p.VringState.unpack, 8),
        (p.VringAddress.unpack, 40),
        (p.Inflight.unpack, 24),
        (p.unpack_single_region, 40),
    ]:
        for size in (good - 1, good + 1, 0):
            with pytest.raises(p.VhostUserProtocolError):
                unpack(bytes(size))
    with pytest.raises(p.VhostUserProtocolError):
        p.ConfigSpace.unpack(struct.pack("=III", 0, 10, 0) + bytes(9))
    with pytest.raises(p.VhostUserProtocolError):
        p.ConfigSpace.unpack(struct.pack("=III", 0, 4, 0x80) + bytes(4))
    with pytest.raises(p.VhostUserProtocolError):
        p.unpack_vring_file(p.pack_u64(0x200))
    with pytest.raises(p.VhostUserProtocolError):
        p.pack_memory_table([p.MemoryRegion(0, 4096, 0)] * 9)


def test_send_recv_carries_real_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    memfds = [os.memfd_create(f"t{i}") for i in range(p.MAX_FDS)]
    try:
        for i, fd in enumerate(memfds):
            os.write(fd, f"region {i}".encode())
        regions = [p.MemoryRegion(i << 30, 4096, 0x10000 * i, 0) for i in range(p.MAX_FDS)]
        p.send(a, p.Message(p.FrontendRequest.SET_MEM_TABLE, p.pack_memory_table(regions)), memfds)
        msg, fds = p.recv(b)
        try:
            assert msg.request == p.FrontendRequest.SET_MEM_TABLE
            assert p.unpack_memory_table(msg.payload) == regions
            assert len(fds) == p.MAX_FDS
            for i, fd in enumerate(fds):
                assert fd not in memfds  # a new descriptor of the same file
                assert os.pread(fd, 16, 0) == f"region {i}".encode()
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        for fd in memfds:
            os.close(fd)


def test_messages_in_a_row_and_replies(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    p.send(a, p.Message(p.FrontendRequest.GET_FEATURES))
    p.send(a, p.Message(p.FrontendRequest.SET_OWNER))
    first, _ = p.recv(b)
    second, _ = p.recv(b)
    assert (first.request, first.payload, second.request) == (1, b"", 3)
    p.send(b, first.reply(p.pack_u64(1 << 30)))
    reply, fds = p.recv(a)
    assert reply.is_reply and p.unpack_u64(reply.payload) == 1 << 30 and fds == []


def test_backend_requests_are_checked_against_their_own_codes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    p.send(a, p.Message(p.BackendRequest.CONFIG_CHANGE_MSG))
    msg, _ = p.recv(b, p.BackendRequest)
    assert msg.request == p.BackendRequest.CONFIG_CHANGE_MSG
    p.send(a, p.Message(44))
    with pytest.raises(p.VhostUserProtocolError, match="unknown FrontendRequest code 44"):
        p.recv(b)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack("=III", 1, 0x2, 0), "version 2"),
        (struct.pack("=III", 1, 0x11, 0), "reserved"),
        (struct.pack("=III", 0, 0x1, 0), "unknown"),
        (struct.pack("=III", 999, 0x1, 0), "unknown"),
        (struct.pack("=III", 1, 0x1, p.MAX_PAYLOAD + 1), "at most"),
        (struct.pack("=III", 1, 0x1, 0xFFFF_FFFF), "at most"),
    ],
)
def test_malformed_headers_are_refused_and_their_fds_closed(
    pair: tuple[socket.socket, socket.socket], raw: bytes, match: str
) -> None:
    a, b = pair
    memfd = os.memfd_create("t")
    try:
        a.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd]).tobytes())])
        before = _open_fds()
        with pytest.raises(p.VhostUserProtocolError, match=match):
            p.recv(b)
        assert _open_fds() == before  # the descriptor that came with it is closed
    finally:
        os.close(memfd)


def test_too_many_descriptors_are_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    memfds = [os.memfd_create(f"t{i}") for i in range(p.MAX_FDS + 4)]
    try:
        raw = p.Message(p.FrontendRequest.SET_OWNER).encode()
        a.sendmsg([raw], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", memfds).tobytes())])
        before = _open_fds()
        with pytest.raises(p.VhostUserProtocolError, match="descriptors"):
            p.recv(b)
        assert _open_fds() == before
        with pytest.raises(p.VhostUserProtocolError, match="descriptors"):
            p.send(a, p.Message(p.FrontendRequest.SET_OWNER), memfds)
    finally:
        for fd in memfds:
            os.close(fd)


def test_hang_up_mid_message_and_before_one(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack("=III", 2, 1, 8) + b"\x00\x00")  # 2 of 8 payload bytes
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.VhostUserDisconnected, match="mid-message"):
        p.recv(b)
    with pytest.raises(p.VhostUserDisconnected):
        p.recv(b)


def test_header_split_over_two_writes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    raw = p.Message(p.FrontendRequest.SET_FEATURES, p.pack_u64(5)).encode()
    a.sendall(raw[:5])
    a.sendall(raw[5:])
    msg, _ = p.recv(b)
    assert p.unpack_u64(msg.payload) == 5


def test_send_to_a_closed_peer(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    with pytest.raises(p.VhostUserDisconnected):
        for _ in range(3):
            p.send(a, p.Message(p.FrontendRequest.GET_FEATURES))
