"""virtio-net's C queues and offloads against a real tap in a network namespace: frames never go
through Python, interrupts leave through the irqfd, mergeable receive buffers, and the offloads:
a TSO frame from the guest reaches the host stack as one GSO packet (the header passed through),
a GSO packet from the host reaches the guest whole when it negotiated GUEST_TSO4 (TUNSETOFFLOAD),
and neither happens without the features. The offload and MRG tests run on the C queues and the
Python reference alike."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from netns_support import Netns, frame, receive_test_frame, unavailable_reason
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio import net as vnet
from vmmkit_devices.virtio import net_io
from vmmkit_devices.virtio.net import NetDevice, format_mac
from vmmkit_devices.virtio.tap import VNET_HDR_SIZE

from vmmkit.config import NetConfig
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory
from vmmkit.virtio.device import VirtioInterruptType

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
SOL_PACKET = 263
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
GSO_TCPV4 = 1
OFFLOADS = (vnet.VIRTIO_NET_F_CSUM | vnet.VIRTIO_NET_F_GUEST_CSUM | vnet.VIRTIO_NET_F_HOST_TSO4
            | vnet.VIRTIO_NET_F_GUEST_TSO4 | vnet.VIRTIO_NET_F_HOST_TSO6 | vnet.VIRTIO_NET_F_GUEST_TSO6
            | vnet.VIRTIO_NET_F_HOST_ECN | vnet.VIRTIO_NET_F_GUEST_ECN | vnet.VIRTIO_NET_F_HOST_UFO
            | vnet.VIRTIO_NET_F_GUEST_UFO)


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns(f"vmmkit-vnq-{os.getpid()}")
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture(params=[True, False], ids=["c", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    if request.param and not net_io.native_net_available():
        pytest.skip(f"native net queues: {net_io.NATIVE_NET_UNAVAILABLE_REASON}")
    return bool(request.param)


_taps = iter(range(1000))


def make_net(netns: Netns, native: bool, **options: object) -> NetDevice:
    options.setdefault("tap", f"vq{next(_taps)}")
    options.setdefault("ip", "192.0.2.1")
    config = NetConfig(mac=format_mac(GUEST_MAC), **options)  # type: ignore[arg-type]
    return netns.run(lambda: NetDevice.from_config("_net0", config, native=native))


def vnet_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket on ``ifname`` that reads and writes a virtio_net_hdr before each frame."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, 0))
    sock.settimeout(5)
    return sock


def tcp_frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    """An Ethernet + IPv4 + TCP frame (checksums left to the offload)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6, 0,
                     bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]))
    return dst + src + b"\x08\x00" + ip + tcp + payload


def gso_header(gso_size: int) -> bytes:
    """virtio_net_hdr: NEEDS_CSUM, TCPV4, hdr_len 54, csum at 34 + 16."""
    return struct.pack("<BBHHHH", 1, GSO_TCPV4, 54, gso_size, 34, 16)


def post_rx(h: Harness, count: int, size: int) -> dict[int, int]:
    heads = {}
    for _ in range(count):
        gpa = h.alloc(size)
        heads[h.driver[0].add([(gpa, size, True)])] = gpa
    h.kick(0)
    return heads


def test_frames_never_reach_python(netns: Netns, activate: Callable[..., Harness],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if not net_io.native_net_available():
        pytest.skip(net_io.NATIVE_NET_UNAVAILABLE_REASON)

    def python_path(*_: object) -> None:
        raise AssertionError("the Python queue path ran")

    monkeypatch.setattr(NetDevice, "_receive", python_path)
    monkeypatch.setattr(NetDevice, "_transmit", python_path)
    device = make_net(netns, True)
    sock = netns.run(lambda: vnet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        heads = post_rx(h, 8, VNET_HDR_SIZE + 1514)
        for i in range(5):
            sock.send(bytes(10) + frame(GUEST_MAC, HOST_MAC, f"to guest {i}".encode()))
        used = h.wait_used(0, 5)
        assert [bytes(h.memory.read(heads[head] + VNET_HDR_SIZE + 14, 10)) for head, _ in used] == \
            [f"to guest {i}".encode() for i in range(5)]
        data = frame(HOST_MAC, GUEST_MAC, b"to host")
        h.submit(1, [(h.alloc(VNET_HDR_SIZE + len(data), data=bytes(VNET_HDR_SIZE) + data),
                      VNET_HDR_SIZE + len(data), False)])
        assert receive_test_frame(_plain(sock), b"to host")[:6] == HOST_MAC
        h.wait_used(1)
        counts = device.counters()
        assert (counts["rx_frames"], counts["tx_frames"]) == (5, 1) and device.broken is None
        assert f"{device.id}_net" in {t.name for t in threading.enumerate()}
    finally:
        sock.close()
    h.close()
    assert f"{device.id}_net" not in {t.name for t in threading.enumerate()}  # reset ends the thread


class _Plain:
    """``recvfrom`` of a PACKET_VNET_HDR socket with the header stripped (for receive_test_frame)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recvfrom(self, size: int) -> tuple[bytes, tuple[object, ...]]:
        data, address = self.sock.recvfrom(size + 10)
        return data[10:], address


def _plain(sock: socket.socket) -> socket.socket:
    return _Plain(sock)  # type: ignore[return-value]


class IrqfdInterrupt:
    """A transport interrupt with an irqfd per queue (as virtio-pci with MSI-X)."""

    def __init__(self) -> None:
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.triggered: list[tuple[VirtioInterruptType, int]] = []

    def trigger(self, kind: VirtioInterruptType, queue_index: int = 0) -> None:
        self.triggered.append((kind, queue_index))

    def queue_irqfd(self, queue_index: int) -> int | None:
        return self.fds[queue_index]


def test_the_c_queues_signal_through_the_irqfds(netns: Netns, memory: GuestMemory, event_loop: EventLoop) -> None:
    if not net_io.native_net_available():
        pytest.skip(net_io.NATIVE_NET_UNAVAILABLE_REASON)
    device = make_net(netns, True)
    sock = netns.run(lambda: vnet_socket(device.tap.name))
    h = Harness(device, memory, event_loop, sizes=[64, 64])
    irq = IrqfdInterrupt()
    h.interrupt = irq  # type: ignore[assignment]
    h.activate()
    try:
        post_rx(h, 2, VNET_HDR_SIZE + 1514)
        sock.send(bytes(10) + frame(GUEST_MAC, HOST_MAC, b"irq"))
        h.wait_used(0)
        data = frame(HOST_MAC, GUEST_MAC, b"irq tx")
        h.submit(1, [(h.alloc(VNET_HDR_SIZE + len(data), data=bytes(VNET_HDR_SIZE) + data),
                      VNET_HDR_SIZE + len(data), False)])
        h.wait_used(1)
        wait_for(lambda: os.eventfd_read(irq.fds[1]) if _readable(irq.fds[1]) else 0, what="the TX irqfd")
        assert os.eventfd_read(irq.fds[0]) >= 1
        assert irq.triggered == []  # no interrupt went through Python
    finally:
        sock.close()
        h.close()
        device.close()
        for fd in irq.fds:
            os.close(fd)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_mergeable_receive_buffers(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    """A 4000-byte frame in 1526-byte buffers: three chains, num_buffers 3 in the first."""
    device = make_net(netns, native, mtu=9000)
    sock = netns.run(lambda: vnet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64], features=device.features() & ~OFFLOADS)
        size = VNET_HDR_SIZE + 1514
        heads = post_rx(h, 4, size)
        data = frame(GUEST_MAC, HOST_MAC, bytes(range(256)) * 15 + b"end")
        sock.send(bytes(10) + data)
        used = h.wait_used(0, 3)
        assert [length for _, length in used] == [size, size, VNET_HDR_SIZE + len(data) - 2 * size]
        got = b"".join(bytes(h.memory.read(heads[head], length)) for head, length in used)
        assert got[:VNET_HDR_SIZE] == bytes(10) + struct.pack("<H", 3) and got[VNET_HDR_SIZE:] == data
        assert device.counters()["rx_frames"] == 1
    finally:
        sock.close()


@pytest.mark.parametrize("offloads", [True, False], ids=["negotiated", "refused"])
def test_tso_from_the_guest(netns: Netns, activate: Callable[..., Harness], native: bool, offloads: bool) -> None:
    """A 2 * 1448-byte TCP payload with a TSO header: the host stack sees one GSO packet when the
    driver negotiated HOST_TSO4, and the header never reaches the tap otherwise."""
    device = make_net(netns, native)
    sock = netns.run(lambda: vnet_socket(device.tap.name))
    try:
        features = device.features() if offloads else device.features() & ~OFFLOADS
        h = activate(device, sizes=[64, 64], features=features)
        packet = gso_header(1448) + struct.pack("<H", 0) + tcp_frame(HOST_MAC, GUEST_MAC, b"T" * 2896)
        h.submit(1, [(h.alloc(len(packet), data=packet), len(packet), False)])
        h.wait_used(1)
        while True:
            data = sock.recv(70000)
            if data[10 + 12 : 10 + 14] == b"\x08\x00":
                break
        assert len(data) == 10 + len(packet) - VNET_HDR_SIZE
        flags, gso_type, _, gso_size = struct.unpack_from("<BBHH", data)
        if offloads:
            assert (gso_type, gso_size) == (GSO_TCPV4, 1448)
        else:
            assert gso_type == 0  # the driver's header was zeroed: a plain (oversized) frame
    finally:
        sock.close()


@pytest.mark.parametrize("offloads", [True, False], ids=["negotiated", "refused"])
def test_tso_to_the_guest(netns: Netns, activate: Callable[..., Harness], native: bool, offloads: bool) -> None:
    """A GSO packet the host sends through the tap: one frame with its GSO header when the driver
    negotiated GUEST_TSO4 (TUNSETOFFLOAD), else the kernel segments it into MTU-sized frames."""
    device = make_net(netns, native)
    sock = netns.run(lambda: vnet_socket(device.tap.name))
    try:
        features = device.features() if offloads else device.features() & ~OFFLOADS
        h = activate(device, sizes=[64, 64], features=features)
        heads = post_rx(h, 16, VNET_HDR_SIZE + 1514)
        payload = b"G" * 2896
        sock.send(gso_header(1448) + tcp_frame(GUEST_MAC, HOST_MAC, payload))
        if offloads:
            used = h.wait_used(0, 2)  # 2950 bytes + header in two mergeable buffers
            got = b"".join(bytes(h.memory.read(heads[head], length)) for head, length in used)
            flags, gso_type, _, gso_size, _, _, num_buffers = struct.unpack_from("<BBHHHHH", got)
            assert (gso_type, gso_size, num_buffers) == (GSO_TCPV4, 1448, 2)
            assert got[VNET_HDR_SIZE + 54 :] == payload
        else:
            used = h.wait_used(0, 2)  # two segments of 1448 payload bytes each, one buffer each
            frames = [bytes(h.memory.read(heads[head], length)) for head, length in used]
            assert [len(f) - VNET_HDR_SIZE - 54 for f in frames] == [1448, 1448]
            assert all(f[:10] == bytes(10) for f in frames)  # no offload fields without GUEST_CSUM
    finally:
        sock.close()
