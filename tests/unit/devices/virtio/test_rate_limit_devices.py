"""Rate limits on the virtio-blk and virtio-net devices, driven by the fake driver over real
image files and a real tap (in a network namespace), with the real event loop and timerfd:
throttled requests stay in the available ring and all complete, at the configured rate; a
rate-limit group is one bucket for all its disks."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blk_support import IN, OUT, S_OK, SECTOR, request
from netns_support import Netns, frame, packet_socket, receive_test_frame, unavailable_reason
from virtio_driver import Harness
from vmmkit_devices.virtio.block import BlockDevice
from vmmkit_devices.virtio.net import NetDevice
from vmmkit_devices.virtio.tap import VNET_HDR_SIZE

from vmmkit.config import DiskConfig, NetConfig, RateLimiterConfig, TokenBucket
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.ratelimit import RateLimitGroups

#: 20 operations per second, at most 2 at once.
OPS_20 = RateLimiterConfig(ops=TokenBucket(size=2, refill_time=100))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(1).randbytes(1 << 20))
    return path


@pytest.fixture
def other_memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate([MemoryRange(0, 16 << 20)]) as mem:
        yield mem


def submit_reads(h: Harness, count: int) -> None:
    for index in range(count):
        request(h, IN, sector=index, in_len=SECTOR, wait=False)


def test_blk_throttled_requests_stay_available_and_all_complete(image: Path,
                                                                activate: Callable[..., Harness]) -> None:
    slow = RateLimiterConfig(ops=TokenBucket(size=2, refill_time=1000))  # 2 per second, 2 at once
    device = BlockDevice.from_config("_disk0", DiskConfig(path=str(image), rate_limiter_config=slow))
    assert device.native_queue is False and device.describe()["rate_limited"] is True
    h = activate(device)
    started = time.monotonic()
    submit_reads(h, 6)
    first = h.wait_used(0, 2)
    time.sleep(0.1)
    if time.monotonic() - started < 0.45:  # the third operation's token is 500 ms away
        assert h.driver[0].take_used() == []  # the rest wait in the available ring
    rest = h.wait_used(0, 4, timeout=10)
    elapsed = time.monotonic() - started
    assert len(first) == 2 and len(rest) == 4
    assert elapsed >= 1.95  # four more operations at 2/s
    assert all(used == SECTOR + 1 for _, used in first + rest)
    assert device.counters()["rate_limited"] >= 1
    assert device.counters()["read_ops"] == 6


def test_blk_bandwidth_limit_paces_bytes(image: Path, activate: Callable[..., Harness]) -> None:
    limits = RateLimiterConfig(bandwidth=TokenBucket(size=8192, refill_time=100))  # 80 KiB/s
    device = BlockDevice.from_config("_disk0", DiskConfig(path=str(image), rate_limiter_config=limits))
    h = activate(device)
    data = random.Random(2).randbytes(8192)
    started = time.monotonic()
    for index in range(4):  # 32 KiB: one bucket at once, then 24 KiB at 80 KiB/s
        assert request(h, OUT, sector=index * 16, out=data, wait=False).status == -1
    h.wait_used(0, 4, timeout=10)
    assert time.monotonic() - started >= 0.29
    assert image.read_bytes()[3 * 8192 : 4 * 8192] == data


def test_blk_group_is_one_bucket_for_all_its_disks(image: Path, tmp_path: Path, other_memory: GuestMemory,
                                                   activate: Callable[..., Harness]) -> None:
    second = tmp_path / "second.img"
    second.write_bytes(bytes(1 << 20))
    groups = RateLimitGroups({"g": OPS_20})
    try:
        disks = [BlockDevice.from_config(f"_disk{i}", DiskConfig(path=str(path), rate_limit_group="g"),
                                         group=groups.get("g"))
                 for i, path in enumerate((image, second))]
        harnesses = [activate(disks[0]), activate(disks[1], memory=other_memory)]
        started = time.monotonic()
        for h in harnesses:
            submit_reads(h, 4)
        for h in harnesses:
            h.wait_used(0, 4, timeout=10)
        # 8 operations from one bucket of 2 at 20/s: 0.3 s (two buckets would take 0.1 s)
        assert time.monotonic() - started >= 0.28
        assert sum(d.counters()["read_ops"] for d in disks) == 8
        for h in harnesses:
            h.close()
        for d in disks:
            d.close()
        assert groups.get("g") is disks[0].rate_limiter  # a disk never closes its group's limiter
    finally:
        groups.close()


def test_blk_group_without_the_group_is_refused(image: Path) -> None:
    from vmmkit.errors import DeviceError

    with pytest.raises(DeviceError, match="rate limit group 'g' not given"):
        BlockDevice.from_config("_disk0", DiskConfig(path=str(image), rate_limit_group="g"))


def test_blk_status_of_limited_requests_is_the_unlimited_one(image: Path, activate: Callable[..., Harness]) -> None:
    limits = RateLimiterConfig(ops=TokenBucket(size=100, refill_time=10))
    device = BlockDevice.from_config("_disk0", DiskConfig(path=str(image), rate_limiter_config=limits))
    h = activate(device)
    reply = request(h, IN, sector=2, in_len=2 * SECTOR)
    assert reply.status == S_OK and reply.data == image.read_bytes()[2 * SECTOR : 4 * SECTOR]
    assert request(h, IN, sector=(1 << 20) // SECTOR, in_len=SECTOR).status == 1  # past the end: IOERR


# -- virtio-net ------------------------------------------------------------------------------------

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ns = Netns(f"vmmkit-vrl-{os.getpid()}")
    try:
        yield ns
    finally:
        ns.close()


def make_net(netns: Netns, tap: str) -> NetDevice:
    config = NetConfig(tap=tap, ip="192.0.2.1", mac=":".join(f"{b:02x}" for b in GUEST_MAC),
                       rate_limiter_config=OPS_20)
    return netns.run(lambda: NetDevice.from_config("_net0", config))


def test_net_tx_is_paced_and_nothing_dropped(netns: Netns, activate: Callable[..., Harness]) -> None:
    device = make_net(netns, "vrl0")
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        header = bytes(VNET_HDR_SIZE)
        started = time.monotonic()
        for index in range(6):
            data = header + frame(HOST_MAC, GUEST_MAC, f"paced {index}".encode())
            h.driver[1].add([(h.alloc(len(data), data=data), len(data), False)])
        h.kick(1)
        got = [receive_test_frame(sock, b"paced") for _ in range(6)]
        elapsed = time.monotonic() - started
        assert [g[14:21] for g in got] == [f"paced {i}".encode() for i in range(6)]
        assert elapsed >= 0.19  # 2 at once, then 4 at 20/s
        assert h.wait_used(1, 6)
        counters = device.counters()
        assert counters["tx_frames"] == 6 and counters.get("tx_dropped", 0) == 0
        assert counters["rate_limited"] >= 1
    finally:
        sock.close()


def test_net_rx_is_paced_and_frames_wait_in_the_tap(netns: Netns, activate: Callable[..., Harness]) -> None:
    device = make_net(netns, "vrl1")
    sock = netns.run(lambda: packet_socket(device.tap.name))
    try:
        h = activate(device, sizes=[64, 64])
        size = VNET_HDR_SIZE + 1514
        for _ in range(6):
            h.driver[0].add([(h.alloc(size), size, True)])
        h.kick(0)
        frames = [frame(GUEST_MAC, HOST_MAC, f"to guest {i}".encode()) for i in range(6)]
        started = time.monotonic()
        for data in frames:
            sock.send(data)
        used = h.wait_used(0, 6, timeout=10)
        assert time.monotonic() - started >= 0.19
        assert len(used) == 6 and device.counters()["rx_frames"] == 6
        assert device.counters().get("rx_dropped", 0) == 0
    finally:
        sock.close()
