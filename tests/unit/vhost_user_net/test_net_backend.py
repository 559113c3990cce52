"""``vmmkit-vhost-user net`` as a process inside a network namespace, on a real tap, over a real
Unix socket, a memfd as guest memory and eventfds, driven by net_frontend.py: frames both ways
between the rings and an AF_PACKET socket on the tap, mergeable receive buffers, a frame waiting
for buffers, EVENT_IDX (avail_event, used_event), GET_VRING_BASE leaving nothing popped behind,
the transmit header rules, the legacy 10-byte header, two queue pairs on a multi-queue tap, and
hostile rings (hypothesis) that must stop the ring, never the daemon. QEMU and vmmkit are the
frontends in tests/integration/test_vhost_user_net_backend.py.

Needs root (namespaces, taps). Alone: ~10 s, the hostile-ring test most of it."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net_frontend import (
    DESC_NEXT,
    DESC_WRITE,
    MEM_SIZE,
    QSIZE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    NetDaemon,
    NetFrontend,
    NetNs,
    TapPeer,
    frame,
    unavailable_reason,
)

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

GUEST = bytes.fromhex("525400123456")
PEER = bytes.fromhex("020000000001")


def _socket_path(tmp_path: Path, name: str) -> Path:
    return Path("/tmp") / f"vunet-{os.getpid()}-{tmp_path.name[-16:]}-{name}"


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def daemon(tmp_path: Path, netns: NetNs) -> Iterator[NetDaemon]:
    served = NetDaemon(_socket_path(tmp_path, "net.sock"), netns.prefix, "--tap", "tap0")
    try:
        yield served
    finally:
        alive = served.alive()
        log = served.stop()
        served.log.unlink(missing_ok=True)
        assert alive and "Traceback" not in log, log


@pytest.fixture
def peer(netns: NetNs) -> Iterator[TapPeer]:
    tap_peer = netns.peer()
    try:
        yield tap_peer
    finally:
        tap_peer.close()


@pytest.fixture
def front(daemon: NetDaemon) -> Iterator[NetFrontend]:
    frontend = NetFrontend(daemon.socket)
    try:
        yield frontend
    finally:
        frontend.close()


def _start(front: NetFrontend, features: int = 0) -> int:
    offered = front.handshake(features)
    assert front.rx.start() == 0 and front.tx.start() == 0
    return offered


def test_frames_cross_between_the_rings_and_the_tap(front: NetFrontend, peer: TapPeer, daemon: NetDaemon) -> None:
    offered = _start(front)
    assert offered & VIRTIO_NET_F_MRG_RXBUF and not offered & VIRTIO_NET_F_MQ
    assert offered & VIRTIO_NET_F_CSUM and offered & VIRTIO_NET_F_GUEST_CSUM  # the tap takes checksum offload
    protocol = vu.unpack_u64(front.get(Req.GET_PROTOCOL_FEATURES))
    assert not protocol & vu.protocol_mask(vu.ProtocolFeature.CONFIG)  # the frontend owns the config space
    assert vu.unpack_u64(front.get(Req.GET_QUEUE_NUM)) == 2
    for i in range(4):
        front.rx.post_buffer(i, 2048)
    # tap -> receive ring: the 12-byte header (no offloads negotiated: zeros, num_buffers 1), then the frame.
    sent = frame(GUEST, PEER, b"to the guest " + bytes(range(200)))
    peer.send(sent)
    front.rx.wait_used(1)
    head, written = front.rx.used(0)
    assert (head, written) == (0, 12 + len(sent))
    assert front.rx.read_slot(0, written) == bytes(10) + struct.pack("<H", 1) + sent
    # transmit ring -> tap, several frames in order.
    out = [frame(PEER, GUEST, f"from the guest {n}".encode() * 20) for n in range(3)]
    for i, data in enumerate(out):
        front.tx.send(i, data)
    front.tx.wait_used(3)
    assert [peer.receive() for _ in out] == out
    assert front.tx.take_used() == [(0, 0), (1, 0), (2, 0)]
    front.close()
    deadline = time.monotonic() + 10
    while "tx_frames=3" not in daemon.log.read_text():
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.05)
    assert "rx_frames=1" in daemon.log.read_text()


def test_mergeable_buffers_and_a_frame_waiting_for_them(front: NetFrontend, peer: TapPeer) -> None:
    _start(front, VIRTIO_NET_F_MRG_RXBUF)
    front.rx.post_buffer(0, 256)
    front.rx.post_buffer(1, 256)
    big = frame(GUEST, PEER, bytes(i & 0xFF for i in range(986)))  # 1000 bytes + 12 of header: 4 buffers
    peer.send(big)
    time.sleep(0.3)
    assert front.rx.used_idx() == 0  # two buffers do not hold it: it waits, nothing is used
    assert front.rx.stop() == 0  # and nothing stays popped: GET_VRING_BASE hands both back
    assert front.rx.start(base=0) == 0
    front.rx.post_buffer(2, 256)
    front.rx.post_buffer(3, 256)
    front.rx.wait_used(4)
    used = front.rx.take_used()
    assert used == [(0, 256), (1, 256), (2, 256), (3, 1012 - 768)]
    data = b"".join(front.rx.read_slot(head, written) for head, written in used)
    assert struct.unpack_from("<H", data, 10)[0] == 4 and data[12:] == big
    # A frame larger than every buffer of the ring together is dropped; the next one arrives.
    for i in range(QSIZE):
        front.rx.post_buffer(i, 64, kick=False)
    os.eventfd_write(front.rx.kick, 1)
    peer.send(frame(GUEST, PEER, bytes(1400)))
    small = frame(GUEST, PEER, b"small")  # 60 bytes + the header: two buffers of 64
    peer.send(small)
    front.rx.wait_used(6)
    time.sleep(0.1)
    assert front.rx.used_idx() == 6
    used = front.rx.take_used()
    assert [written for _, written in used] == [64, 8]
    data = b"".join(front.rx.read_slot(head, written) for head, written in used)
    assert data == bytes(10) + struct.pack("<H", 2) + small


def test_event_idx_and_a_ring_without_buffers(front: NetFrontend, peer: TapPeer) -> None:
    _start(front, VIRTIO_F_EVENT_IDX)
    first = frame(GUEST, PEER, b"first")
    peer.send(first)
    deadline = time.monotonic() + 5
    while front.rx.avail_event() != 0 or front.rx.used_idx():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    front.rx.post_buffer(0, 2048)  # the kick the device asked for (avail_event 0)
    front.rx.wait_used(1)
    assert front.rx.read_slot(0, 12 + len(first))[12:] == first
    assert front.rx.called() and front.rx.avail_event() == 1
    # used_event 2: no interrupt for the second frame, one for the third.
    front.rx.set_used_event(2)
    for i in range(1, 4):
        front.rx.post_buffer(i, 2048)
    peer.send(frame(GUEST, PEER, b"second"))
    front.rx.wait_used(2)
    time.sleep(0.1)
    assert not front.rx.called()
    peer.send(frame(GUEST, PEER, b"third"))
    front.rx.wait_used(3)
    assert front.rx.called()


def test_with_event_idx_a_frame_waiting_for_buffers_asks_for_the_next_one(front: NetFrontend, peer: TapPeer) -> None:
    """The chains popped for it go back, and avail_event points past them (at the available
    index): the driver's next buffer kicks, the ones already there would not."""
    _start(front, VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_EVENT_IDX)
    front.rx.post_buffer(0, 256)
    front.rx.post_buffer(1, 256)
    peer.send(frame(GUEST, PEER, bytes(986)))  # 1012 bytes with the header: four buffers
    deadline = time.monotonic() + 5
    while front.rx.avail_event() != 2:
        assert time.monotonic() < deadline, f"avail_event {front.rx.avail_event()}"
        time.sleep(0.02)
    assert front.rx.used_idx() == 0
    front.rx.post_buffer(2, 256, kick=False)
    front.rx.post_buffer(3, 256)
    front.rx.wait_used(4)
    assert [written for _, written in front.rx.take_used()] == [256, 256, 256, 244]


def test_transmit_headers_ask_only_for_what_was_negotiated(front: NetFrontend, peer: TapPeer) -> None:
    _start(front, VIRTIO_NET_F_CSUM)
    bad = frame(PEER, GUEST, b"bad header")
    front.tx.send(0, bad, header=bytes([2]) + bytes(11))  # DATA_VALID: not a transmit flag
    front.tx.send(1, bad, header=bytes([0, 1]) + bytes(10))  # TSO4 without HOST_TSO4
    good = frame(PEER, GUEST, b"good header")
    front.tx.send(2, good, header=bytes(12))
    front.tx.wait_used(3)
    assert peer.receive() == good


def test_without_csum_a_transmit_header_is_replaced_by_zeros(front: NetFrontend, peer: TapPeer) -> None:
    _start(front)
    sent = frame(PEER, GUEST, b"zeroed header")
    front.tx.send(0, sent, header=bytes([1, 1, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0]))
    front.tx.wait_used(1)
    assert peer.receive() == sent


def test_a_legacy_header_is_10_bytes(daemon: NetDaemon, peer: TapPeer) -> None:
    front = NetFrontend(daemon.socket)
    try:
        front.get(Req.GET_FEATURES)
        vu.send(front.sock, vu.Message(Req.SET_OWNER, b""))
        vu.send(front.sock, vu.Message(Req.SET_FEATURES, vu.pack_u64(0)))  # neither VERSION_1 nor MRG_RXBUF
        region = vu.MemoryRegion(0, MEM_SIZE, 0x7F00_0000_0000, 0)
        vu.send(front.sock, vu.Message(Req.SET_MEM_TABLE, vu.pack_memory_table([region])), [front.memfd])
        for ring in front.rings:
            q = ring.index
            for request, payload, fds in (
                (Req.SET_VRING_NUM, vu.VringState(q, QSIZE).pack(), []),
                (Req.SET_VRING_ADDR, vu.VringAddress(q, 0, 0x7F00_0000_0000 + ring.desc,
                                                     0x7F00_0000_0000 + ring.used_ring,
                                                     0x7F00_0000_0000 + ring.avail).pack(), []),
                (Req.SET_VRING_BASE, vu.VringState(q, 0).pack(), []),
                (Req.SET_VRING_CALL, vu.pack_vring_file(q), [ring.call]),
                (Req.SET_VRING_KICK, vu.pack_vring_file(q), [ring.kick]),
            ):
                vu.send(front.sock, vu.Message(request, payload), fds)
        assert vu.unpack_u64(front.get(Req.GET_FEATURES))  # every message above was taken
        front.rx.post_buffer(0, 2048)
        sent = frame(GUEST, PEER, b"legacy")
        peer.send(sent)
        front.rx.wait_used(1)
        assert front.rx.used(0) == (0, 10 + len(sent)) and front.rx.read_slot(0, 10 + len(sent)) == bytes(10) + sent
        out = frame(PEER, GUEST, b"legacy out")
        front.tx.send(0, out, header=bytes(10))
        front.tx.wait_used(1)
        assert peer.receive() == out
    finally:
        front.close()


def test_hostile_chains_stop_their_ring_and_the_daemon_goes_on(front: NetFrontend, peer: TapPeer) -> None:
    _start(front)
    front.tx.send(0, b"", header=bytes(5))  # shorter than the header
    deadline = time.monotonic() + 5
    while not front.tx.stopped():
        assert time.monotonic() < deadline, "the transmit ring did not stop"
        time.sleep(0.02)
    front.rx.desc_write(0, front.rx.slot(0), 8, DESC_WRITE)  # no room for the header
    front.rx.post(0)
    peer.send(frame(GUEST, PEER, b"x"))
    while not front.rx.stopped():
        assert time.monotonic() < deadline, "the receive ring did not stop"
        time.sleep(0.02)
    assert front.rx.used_idx() == 0 and front.alive()


def test_two_queue_pairs_on_a_multi_queue_tap(tmp_path: Path) -> None:
    ns = NetNs(multi_queue=True)
    daemon = NetDaemon(_socket_path(tmp_path, "mq.sock"), ns.prefix, "--tap", "tap0", "--queues", "2")
    front = NetFrontend(daemon.socket, rings=4)
    peer = ns.peer()
    try:
        assert front.handshake(VIRTIO_NET_F_MQ) & VIRTIO_NET_F_MQ
        assert vu.unpack_u64(front.get(Req.GET_QUEUE_NUM)) == 4
        for ring in front.rings:
            assert ring.start() == 0
        for i in range(8):
            front.rings[0].post_buffer(i, 2048)
            front.rings[2].post_buffer(i, 2048)
        out = frame(PEER, GUEST, b"second pair")
        front.rings[3].send(0, out)
        front.rings[3].wait_used(1)
        assert peer.receive() == out
        for n in range(6):  # the kernel picks a tap queue per flow: every frame lands on one of the pairs
            peer.send(frame(GUEST, bytes([2, 0, 0, 0, 0, n]), f"flow {n}".encode()))
        deadline = time.monotonic() + 5
        while front.rings[0].used_idx() + front.rings[2].used_idx() < 6:
            assert time.monotonic() < deadline, (front.rings[0].used_idx(), front.rings[2].used_idx())
            time.sleep(0.02)
    finally:
        peer.close()
        front.close()
        log = daemon.stop()
        daemon.log.unlink(missing_ok=True)
        ns.close()
    assert "Traceback" not in log, log


# -- hostile rings (hypothesis) ---------------------------------------------------------------

_addresses = st.one_of(st.integers(0, MEM_SIZE + 4096), st.integers(0, 2**64 - 1),
                       st.sampled_from([MEM_SIZE - 1, MEM_SIZE - 16, 2**64 - 16, 0x100000]))
_lengths = st.one_of(st.integers(0, 0x20000), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 11, 12, 13, 60]))
_descriptor = st.tuples(_addresses, _lengths, st.integers(0, 7), st.integers(0, QSIZE + 2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rx_descs=st.lists(_descriptor, min_size=1, max_size=4), tx_descs=st.lists(_descriptor, min_size=1, max_size=4),
       heads=st.tuples(st.integers(0, QSIZE + 1), st.integers(0, QSIZE + 1)),
       avail_jump=st.sampled_from([1, 1, 1, 2, QSIZE + 1, 0x8000]), mergeable=st.booleans())
def test_hostile_rings_fail_the_ring_never_the_daemon(
    daemon: NetDaemon, peer: TapPeer, rx_descs: list[tuple[int, int, int, int]],
    tx_descs: list[tuple[int, int, int, int]], heads: tuple[int, int], avail_jump: int, mergeable: bool
) -> None:
    front = NetFrontend(daemon.socket)
    try:
        _start(front, VIRTIO_NET_F_MRG_RXBUF if mergeable else 0)
        for ring, descs, head in ((front.rx, rx_descs, heads[0]), (front.tx, tx_descs, heads[1])):
            for index, (address, length, flags, nxt) in enumerate(descs):
                ring.desc_write(index + 4, address, length, flags & (DESC_NEXT | DESC_WRITE | 4), nxt)
            ring.desc_write(0, 0x100000, 64, DESC_NEXT | (DESC_WRITE if ring is front.rx else 0), 4)
            struct.pack_into("<H", front.mem, ring.avail + 4, head)
            struct.pack_into("<H", front.mem, ring.avail + 6, 4)
            ring.avail_idx = avail_jump
            struct.pack_into("<H", front.mem, ring.avail + 2, avail_jump)
            os.eventfd_write(ring.kick, 1)
        peer.send(frame(GUEST, PEER, b"hostile"))
        for _ in range(100):
            if (front.rx.used_idx() or front.rx.stopped()) and (front.tx.used_idx() or front.tx.stopped()):
                break
            time.sleep(0.005)
        assert front.rx.used_idx() <= 2 and front.tx.used_idx() <= 2
        assert front.alive()  # the daemon still answers this frontend
    finally:
        front.close()
    assert daemon.alive(), daemon.log.read_text()
