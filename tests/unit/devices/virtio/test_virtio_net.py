"""virtio-net against a real tap device inside a network namespace this module creates,
exchanging real Ethernet frames with an AF_PACKET socket bound to the tap."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest
from netns_support import Netns, frame, packet_socket, receive_test_frame, unavailable_reason
from virtio_driver import Harness, wait_for
from vmmkit_devices.virtio import net_io
from vmmkit_devices.virtio.net import (
    CONFIG,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    NetDevice,
    VirtioNetType,
    format_mac,
    generated_mac,
    offered_offloads,
)
from vmmkit_devices.virtio.tap import TUN_F_CSUM, VNET_HDR_SIZE, Tap

from vmmkit.config import MemoryConfig, NetConfig, VmConfig
from vmmkit.errors import DeviceError
from vmmkit.virtio.device import VIRTIO_F_VERSION_1

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
BROADCAST = b"\xff" * 6
RX_BUFFER = VNET_HDR_SIZE + 1514
#: The header the device hands the guest: no offloads, num_buffers = 1.
RX_HEADER = bytes(10) + struct.pack("<H", 1)
#: CSUM, GUEST_CSUM, GUEST/HOST TSO4, TSO6, ECN, UFO.
OFFLOADS = 0b111_1111_1000_0011


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns(f"vmmkit-vnet-{os.getpid()}")
    try:
        yield ns
    finally:
        ns.close()


_taps = iter(range(1000))


@pytest.fixture(params=[True, False], ids=["c", "python"])
def native(request: pytest.FixtureRequest) -> bool:
    """Each test that moves frames runs on the C queues and on the Python reference."""
    if request.param and not net_io.native_net_available():
        pytest.skip(f"native net queues: {net_io.NATIVE_NET_UNAVAILABLE_REASON}")
    return bool(request.param)


def make_net(netns: Netns, native: bool | None = None, **options: object) -> NetDevice:
    options.setdefault("tap", f"vt{next(_taps)}")
    options.setdefault("ip", "192.0.2.1")  # TEST-NET-1, inside our namespace only
    options.setdefault("mac", format_mac(GUEST_MAC))
    config = NetConfig(**options)  # type: ignore[arg-type]
    return netns.run(lambda: NetDevice.from_config("_net0", config, native=native))


def post_rx(h: Harness, count: int, size: int = RX_BUFFER) -> list[int]:
    buffers = []
    for _ in range(count):
        gpa = h.alloc(size)
        h.driver[0].add([(gpa, size, True)])
        buffers.append(gpa)
    h.kick(0)
    return buffers


def transmit(h: Harness, data: bytes, split_header: bool = True) -> None:
    header = bytes(VNET_HDR_SIZE)
    if split_header:
        h.submit(1, [(h.alloc(VNET_HDR_SIZE, data=header), VNET_HDR_SIZE, False),
                     (h.alloc(len(data), data=data), len(data), False)])
    else:
        packet = header + data
        h.submit(1, [(h.alloc(len(packet), data=packet), len(packet), False)])


def received(h: Harness, buffers: dict[int, int], count: int = 1) -> list[bytes]:
    """The frames in the next ``count`` used RX buffers (header checked and stripped)."""
    out = []
    for head, length in h.wait_used(0, count):
        data = h.memory.read(buffers[head], length)
        assert data[:VNET_HDR_SIZE] == RX_HEADER
        out.append(data[VNET_HDR_SIZE:])
    return out


def rx_heads(h: Harness, gpas: list[int]) -> dict[int, int]:
    """head -> buffer gpa of single-descriptor chains posted by :func:`post_rx`."""
    return {head: gpa for head, gpa in zip(sorted(h.driver[0].chains), gpas, strict=False)}


def test_features_config_and_tap_setup(netns: Netns) -> None:
    device = make_net(netns, mtu=1400, host_mac="02:00:00:00:00:01")
    try:
        features = device.features()
        assert features & VIRTIO_NET_F_MAC and features & VIRTIO_NET_F_STATUS and features & VIRTIO_NET_F_MTU
        assert features & VIRTIO_F_VERSION_1
        # CSUM, GUEST_CSUM, TSO4/6, ECN and UFO both ways: offered as far as the tap takes them
        assert device.tap.offloads & TUN_F_CSUM
        assert features & OFFLOADS == offered_offloads(device.tap.offloads) != 0
        assert features & VIRTIO_NET_F_MRG_RXBUF
        mac, status, pairs, mtu = CONFIG.unpack(device.config_space())
        assert (mac, status, pairs, mtu) == (GUEST_MAC, 1, 1, 1400)
        link = netns.ip("link", "show", device.tap.name)
        assert "UP" in link and "mtu 1400" in link and "02:00:00:00:00:01" in link
        assert "192.0.2.1/24" in netns.ip("addr", "show", device.tap.name)
    finally:
        device.close()
    assert device.tap.fd == -1


def test_frames_both_ways(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    device = make_net(netns, native)
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        gpas = post_rx(h, 4)
        heads = rx_heads(h, gpas)
        to_guest = frame(GUEST_MAC, HOST_MAC, b"hello guest " + bytes(range(100)))
        sock.send(to_guest)
        assert received(h, heads) == [to_guest]

        to_host = frame(BROADCAST, GUEST_MAC, b"hello host " + bytes(200))
        transmit(h, to_host)
        assert receive_test_frame(sock, b"hello host") == to_host
        transmit(h, frame(HOST_MAC, GUEST_MAC, b"one buffer"), split_header=False)
        assert receive_test_frame(sock, b"one buffer")[:6] == HOST_MAC
        assert h.wait_used(1, 2)
        counters = device.counters()
        assert counters["rx_frames"] == 1 and counters["rx_bytes"] == len(to_guest)
        assert counters["tx_frames"] == 2 and counters["tx_bytes"] == len(to_host) + 14 + len(b"one buffer")
    finally:
        sock.close()


def test_rx_waits_for_buffers(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    device = make_net(netns, native)
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        frames = [frame(GUEST_MAC, HOST_MAC, f"early {i}".encode()) for i in range(3)]
        for data in frames:
            sock.send(data)
        h.settle(0.1)
        assert h.driver[0].used_idx == 0  # no buffers: nothing delivered, nothing lost
        assert device.tap.fd not in device._readers  # and the tap is not polled meanwhile
        gpas = post_rx(h, 3)
        assert received(h, rx_heads(h, gpas), 3) == frames
    finally:
        sock.close()


def test_too_big_frames_are_dropped_and_the_buffer_kept(netns: Netns, activate: Callable[..., Harness],
                                                        native: bool) -> None:
    device = make_net(netns, native)
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64], features=device.features() & ~VIRTIO_NET_F_MRG_RXBUF)
        gpas = post_rx(h, 1, size=VNET_HDR_SIZE + 100)
        heads = rx_heads(h, gpas)
        sock.send(frame(GUEST_MAC, HOST_MAC, bytes(500)))
        small = frame(GUEST_MAC, HOST_MAC, b"fits")
        sock.send(small)
        assert received(h, heads) == [small]
        assert device.counters()["rx_dropped"] == 1
    finally:
        sock.close()


def test_pause_stops_both_directions(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    device = make_net(netns, native)
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        gpas = post_rx(h, 2)
        heads = rx_heads(h, gpas)
        device.pause()
        sock.send(frame(GUEST_MAC, HOST_MAC, b"while paused"))
        transmit(h, frame(BROADCAST, GUEST_MAC, b"tx while paused"))
        h.settle(0.1)
        assert h.driver[0].used_idx == 0 and h.driver[1].used_idx == 0
        device.resume()
        assert received(h, heads)[0].endswith(b"while paused")
        assert receive_test_frame(sock, b"tx while paused")
    finally:
        sock.close()


def test_adopted_fd(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    tap = netns.run(lambda: Tap.open("vtfd0"))
    netns.run(tap.set_up)
    fd = os.dup(tap.fd)
    try:
        device = NetDevice.from_config("_net1", NetConfig(fds=(fd,), mac=format_mac(GUEST_MAC)), native=native)
        assert device.tap.name == "vtfd0" and device.tap.fd != fd
        sock = netns.run(lambda: packet_socket("vtfd0"))
        try:
            h = activate(device, sizes=[64, 64])
            gpas = post_rx(h, 1)
            data = frame(GUEST_MAC, HOST_MAC, b"via fd")
            sock.send(data)
            assert received(h, rx_heads(h, gpas)) == [data]
        finally:
            sock.close()
        os.fstat(fd)  # the caller's fd stays open
    finally:
        os.close(fd)
        tap.close()


def test_adopting_a_non_tap_fd_fails(tmp_path: object) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceError, match="not a tap"):
            Tap.adopt(r)
    finally:
        os.close(r)
        os.close(w)


def test_hostile_transmit_chains(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    device = make_net(netns, native)
    h = activate(device, sizes=[64, 64])
    transmit(h, b"", split_header=False)  # header only: the tap refuses an empty frame
    transmit(h, bytes(5))  # not an Ethernet frame
    gpa = h.alloc(16)
    h.submit(1, [(gpa, 0x10000 + 100, False)])  # longer than any frame: dropped unread
    assert len(h.wait_used(1, 3)) == 3
    counters = device.counters()
    assert counters["tx_errors"] == 2 and counters["tx_dropped"] == 1 and device.broken is None
    h.submit(1, [(h.alloc(8), 8, False)])  # shorter than the header: unanswerable
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert h.errors and "header" in device.broken


def test_hostile_receive_chain(netns: Netns, activate: Callable[..., Harness], native: bool) -> None:
    device = make_net(netns, native)
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        h.submit(0, [(h.alloc(64), 64, False)])  # a receive buffer the device may not write
        sock.send(frame(GUEST_MAC, HOST_MAC, b"x"))
        wait_for(lambda: device.broken is not None, what="the device to fail")
        h.settle(0.05)
        assert device.tap.fd not in device._readers
    finally:
        sock.close()


def test_generated_mac_is_stable_and_local() -> None:
    first = generated_mac("vmmkit:_net0:vmtap0")
    assert first == generated_mac("vmmkit:_net0:vmtap0") != generated_mac("vmmkit:_net1:vmtap0")
    assert first[0] & 0x02 and not first[0] & 0x01  # locally administered unicast
    assert len(first) == 6


def test_config_mapping_and_refusals() -> None:
    config = VmConfig(net=[NetConfig(tap="a"), NetConfig(tap="b", id="lan", transport="mmio"),
                           NetConfig(vhost_user=True, vhost_socket="/tmp/v.sock")],
                      memory=MemoryConfig(size=1 << 30, shared=True))
    requests = VirtioNetType.requests(config.assign_ids())
    assert [(r.id, r.transport) for r in requests] == [("_net0", None), ("lan", "mmio")]
    with pytest.raises(DeviceError, match="multi-queue"):
        NetDevice.from_config("_net0", NetConfig(tap="x", num_queues=4))
    with pytest.raises(DeviceError, match="vhost-user"):
        NetDevice.from_config("_net0", NetConfig(vhost_user=True, vhost_socket="/tmp/v.sock"))
    with pytest.raises(DeviceError, match="interface name"):
        Tap.open("x" * 16)


def test_tap_name_in_use(netns: Netns) -> None:
    device = make_net(netns, tap="vtbusy")
    try:
        with pytest.raises(DeviceError, match="in use"):
            make_net(netns, tap="vtbusy")
    finally:
        device.close()
