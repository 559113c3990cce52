"""Hostile packets for the vsock muxer and device: the header checks one field at a time, and
Hypothesis sequences of arbitrary headers (any op, type, CIDs, ports, lengths, flags, credit)
against a real muxer with real Unix sockets. Whatever the guest sends, the muxer raises
nothing, every packet it returns is well formed and within the room and credit given, and the
device never breaks on a chain that holds a header."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import Harness
from vmmkit_devices.virtio.vsock.connection import BUF_ALLOC
from vmmkit_devices.virtio.vsock.device import VsockDevice
from vmmkit_devices.virtio.vsock.loop import MuxerLoop
from vmmkit_devices.virtio.vsock.muxer import MAX_BACKLOG, Muxer, bind_listener, parse_connect
from vmmkit_devices.virtio.vsock.packet import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    TYPE_STREAM,
    Header,
    Op,
    check_guest_header,
)
from vsock_guest import GUEST_CID, FakeGuest

from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory

LISTENING_PORT = 5000


def guest_header(**fields: int) -> Header:
    base = {"src_cid": GUEST_CID, "dst_cid": HOST_CID, "src_port": 1, "dst_port": 2, "len": 0,
            "type": TYPE_STREAM, "op": Op.REQUEST, "flags": 0, "buf_alloc": 4096, "fwd_cnt": 0}
    base.update(fields)
    return Header(**base)


def test_header_layout_is_the_spec_s() -> None:
    header = Header(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    packed = header.pack()
    assert HEADER_SIZE == len(packed) == 44
    assert packed[:8] == (1).to_bytes(8, "little") and packed[24:28] == (5).to_bytes(4, "little")
    assert packed[28:30] == (6).to_bytes(2, "little") and packed[30:32] == (7).to_bytes(2, "little")
    assert packed[40:44] == (10).to_bytes(4, "little") and Header.unpack(packed) == header


@pytest.mark.parametrize(("fields", "available", "expected"), [
    ({}, 0, None),
    ({"op": Op.RW, "len": 10}, 10, None),
    ({"op": Op.RW, "len": 10}, 9, "buffer holds 9"),
    ({"op": Op.RW, "len": MAX_PAYLOAD + 1}, 1 << 20, "over"),
    ({"op": Op.RW, "len": 0xFFFF_FFFF}, 0, "over"),
    ({"op": Op.SHUTDOWN, "len": 1}, 1, "payload bytes"),
    ({"op": 0}, 0, "unknown operation 0"),
    ({"op": 8}, 0, "unknown operation 8"),
    ({"type": 2}, 0, "socket type 2"),
    ({"dst_cid": GUEST_CID}, 0, "destination CID"),
    ({"dst_cid": HOST_CID + (1 << 32)}, 0, "destination CID"),  # the upper half counts
    ({"src_cid": 4}, 0, "source CID"),
    ({"op": Op.RST, "dst_cid": 99, "type": 9}, 0, None),  # an RST is never answered anyway
])
def test_check_guest_header(fields: dict[str, int], available: int, expected: str | None) -> None:
    problem = check_guest_header(guest_header(**fields), available, GUEST_CID)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem[0]
        assert problem[1] is ("src_cid" not in fields)


@pytest.mark.parametrize(("line", "port"), [
    (b"CONNECT 0\n", 0), (b"CONNECT 4294967294\n", 4294967294), (b"CONNECT 4294967295\n", None),
    (b"CONNECT 1\r\n", None), (b"CONNECT  1\n", None), (b"CONNECT 1", None), (b"CONNECT 0x10\n", None),
])
def test_parse_connect(line: bytes, port: int | None) -> None:
    assert parse_connect(line) == port


# -- the muxer under arbitrary packets --------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vsf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


ports = st.sampled_from([1, 2, LISTENING_PORT, 40000, 0xFFFF_FFFF])
headers = st.builds(
    Header,
    src_cid=st.sampled_from([GUEST_CID, GUEST_CID + (1 << 32), HOST_CID, 0xFFFF_FFFF_FFFF_FFFF]),
    dst_cid=st.sampled_from([HOST_CID, GUEST_CID, 0, 1 << 63]),
    src_port=ports,
    dst_port=ports,
    len=st.sampled_from([0, 1, 100, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFF_FFFF]),
    type=st.sampled_from([TYPE_STREAM, 0, 2, 0xFFFF]),
    op=st.sampled_from([*range(0, 9), 0xFFFF]),
    flags=st.sampled_from([0, 1, 2, 3, 0xFFFF_FFFF]),
    buf_alloc=st.sampled_from([0, 1, 4096, BUF_ALLOC, 0xFFFF_FFFF]),
    fwd_cnt=st.sampled_from([0, 1, 4096, 0xFFFF_FFFF]),
)
packets = st.tuples(headers, st.integers(0, 200))  # the header and the payload bytes the chain has


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(packets, min_size=1, max_size=30), rooms=st.lists(st.integers(0, 5000), min_size=1))
def test_muxer_survives_arbitrary_packets(fuzz_dir: Path, sequence: list[tuple[Header, int]],
                                          rooms: list[int]) -> None:
    path = str(fuzz_dir / "m.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}_{LISTENING_PORT}")
    server.listen(64)
    loop = MuxerLoop("fuzz")
    counts: dict[str, int] = {}
    muxer = Muxer(GUEST_CID, path, bind_listener(path, "fuzz"), loop, lambda: None,
                  lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n))
    muxer.start()
    try:
        for index, (header, available) in enumerate(sequence):
            muxer.from_guest(header, available, bytes)  # the payload: n zero bytes
            room = rooms[index % len(rooms)]
            for _ in range(8):
                packet = muxer.next_rx(room)
                if packet is None:
                    break
                out, payload = packet
                assert (out.src_cid, out.dst_cid, out.type) == (HOST_CID, GUEST_CID, TYPE_STREAM)
                assert out.buf_alloc == BUF_ALLOC or out.op == Op.RST  # an RST of no connection has none
                assert out.op in set(Op) and out.len == len(payload) <= room
                assert out.op == Op.RW or out.len == 0
        assert len(muxer.backlog) <= MAX_BACKLOG
        for conn in muxer.connections.values():
            assert len(conn.tx_buf) <= BUF_ALLOC
    finally:
        muxer.close()
        loop.close()
        server.close()
        Path(f"{path}_{LISTENING_PORT}").unlink()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(packets, min_size=1, max_size=12), split=st.booleans())
def test_device_survives_arbitrary_packets(fuzz_dir: Path, memory: GuestMemory, event_loop: EventLoop,
                                           sequence: list[tuple[Header, int]], split: bool) -> None:
    path = fuzz_dir / "d.sock"
    device = VsockDevice("_vsock0", GUEST_CID, str(path))
    h = Harness(device, memory, event_loop, sizes=[32, 32, 8]).activate()
    try:
        guest = FakeGuest(h, rx_buffers=8, tx_buffers=4)
        for header, available in sequence:
            guest.send_raw(header.pack() + bytes(available), split=split)
        guest.quiet(0.02)
        assert device.broken is None, device.broken
    finally:
        h.close()
        device.close()
