"""Hostile drivers against every device: descriptors outside guest RAM, into holes, wrapping
the address space, huge lengths, loops, bad heads, a runaway available index, nested indirect
tables, buffers in the wrong direction, short headers. Guest RAM sits between inaccessible host
pages, so a device that touched anything outside it would kill the test process. Each attack
must leave the device broken (or answered with an error status), the transport told, and the
VMM running; after a reset the device serves a valid request again."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from blk_support import IN, OUT, S_IOERR, S_OK, request
from netns_support import FakeTap
from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, Harness, guarded_memory, wait_for
from vmmkit_devices.console.backends import NullBackend
from vmmkit_devices.virtio.block import BlockDevice
from vmmkit_devices.virtio.common import QueueDevice
from vmmkit_devices.virtio.console import ConsoleDevice
from vmmkit_devices.virtio.net import NetDevice
from vmmkit_devices.virtio.rng import RngDevice
from vmmkit_devices.virtio.tap import VNET_HDR_SIZE

from vmmkit.config import DiskConfig, RngConfig
from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory

MIB = 1 << 20
#: Two adjacent regions, a hole, a third region; each between guard pages.
LAYOUT = [(0, 2 * MIB), (2 * MIB, MIB), (4 * MIB, MIB)]
HOLE = 3 * MIB
DATA = 1 * MIB


@pytest.fixture
def guarded() -> Iterator[GuestMemory]:
    with guarded_memory(LAYOUT) as memory:
        yield memory


@dataclass
class Target:
    """A device, the queue to attack, whether that queue's buffers are device-writable, and a
    valid exchange that must work after a reset."""

    name: str
    queue: int
    writable: bool
    make: Callable[[Path, EventLoop], QueueDevice]
    prime: Callable[[QueueDevice], None]
    valid: Callable[[Harness], None]


def _blk(tmp: Path, loop: EventLoop) -> QueueDevice:
    path = tmp / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    return BlockDevice.from_config("_disk0", DiskConfig(path=str(path)))


def _blk_valid(h: Harness) -> None:
    assert request(h, OUT, 1, out=b"\x5a" * 512).status == S_OK
    assert request(h, IN, 1, in_len=512).data == b"\x5a" * 512


def _net(tmp: Path, loop: EventLoop) -> QueueDevice:
    """The C queues where the native module is built (else the Python path: _net_python's)."""
    return NetDevice("_net0", FakeTap(), bytes.fromhex("525400000001"))


def _net_python(tmp: Path, loop: EventLoop) -> QueueDevice:
    return NetDevice("_net0", FakeTap(), bytes.fromhex("525400000001"), native=False)


def _net_valid(h: Harness) -> None:
    device = h.device
    assert isinstance(device, NetDevice) and isinstance(device.tap, FakeTap)
    frame = b"\xff" * 12 + b"\x88\xb5hello"
    h.submit(1, [(h.alloc(VNET_HDR_SIZE + len(frame), data=bytes(VNET_HDR_SIZE) + frame),
                  VNET_HDR_SIZE + len(frame), False)])
    device.tap.peer.settimeout(5)
    assert device.tap.peer.recv(100) == bytes(VNET_HDR_SIZE) + frame
    while True:  # frames from before the reset are still queued, as in a real tap
        try:
            os.read(device.tap.fd, 65536)
        except BlockingIOError:
            break
    gpa = h.alloc(256)
    h.submit(0, [(gpa, 256, True)])
    device.tap.peer.send(bytes(VNET_HDR_SIZE) + frame)
    ((_, length),) = h.wait_used(0)
    assert bytes(h.memory.read(gpa + VNET_HDR_SIZE, length - VNET_HDR_SIZE)) == frame


def _net_prime(device: QueueDevice) -> None:
    assert isinstance(device, NetDevice) and isinstance(device.tap, FakeTap)
    device.tap.peer.send(bytes(VNET_HDR_SIZE) + b"\xff" * 14)


def _console(tmp: Path, loop: EventLoop) -> QueueDevice:
    return ConsoleDevice("__console", NullBackend("virtio_console"), loop)


def _console_prime(device: QueueDevice) -> None:
    assert isinstance(device, ConsoleDevice)
    device.receive(b"input")


def _console_valid(h: Harness) -> None:
    h.submit(1, [(h.alloc(5, data=b"hello"), 5, False)])
    assert h.wait_used(1)
    buffers = {h.driver[0].add([(gpa, 16, True)]): gpa for gpa in (h.alloc(16), h.alloc(16))}
    h.kick(0)
    assert isinstance(h.device, ConsoleDevice)
    h.device.receive(b"back")
    got = b""

    def arrived() -> bool:
        nonlocal got
        got += b"".join(bytes(h.memory.read(buffers[head], n)) for head, n in h.driver[0].take_used())
        return got.endswith(b"back")  # input buffered before the reset may come first

    wait_for(arrived, what="console input")


def _rng(tmp: Path, loop: EventLoop) -> QueueDevice:
    return RngDevice.from_config("__rng", RngConfig())


def _rng_valid(h: Harness) -> None:
    gpa = h.alloc(32)
    h.submit(0, [(gpa, 32, True)])
    ((_, length),) = h.wait_used(0)
    assert length == 32 and bytes(h.memory.read(gpa, 32)) != b"\xcc" * 32


def _nothing(device: QueueDevice) -> None:
    pass


TARGETS = [
    Target("blk", 0, True, _blk, _nothing, _blk_valid),
    Target("net-tx", 1, False, _net, _nothing, _net_valid),
    Target("net-rx", 0, True, _net, _net_prime, _net_valid),
    Target("net-tx-python", 1, False, _net_python, _nothing, _net_valid),
    Target("net-rx-python", 0, True, _net_python, _net_prime, _net_valid),
    Target("console-tx", 1, False, _console, _nothing, _console_valid),
    Target("console-rx", 0, True, _console, _console_prime, _console_valid),
    Target("rng", 0, True, _rng, _nothing, _rng_valid),
]


def _buffers(*buffers: tuple[int, int]) -> Callable[[Harness, int, bool], None]:
    def attack(h: Harness, queue: int, writable: bool) -> None:
        h.submit(queue, [(gpa, length, writable) for gpa, length in buffers])

    return attack


def _loop(h: Harness, queue: int, writable: bool) -> None:
    driver = h.driver[queue]
    head = driver.free.pop(0)
    driver.write_desc(head, DATA, 16, F_NEXT | (F_WRITE if writable else 0), head)
    driver.publish(head)
    h.kick(queue)


def _bad_head(h: Harness, queue: int, writable: bool) -> None:
    h.driver[queue].publish(0x7FFF)
    h.kick(queue)


def _avail_runaway(h: Harness, queue: int, writable: bool) -> None:
    driver = h.driver[queue]
    driver.avail_idx = (driver.avail_idx + driver.size + 5) & 0xFFFF
    h.memory.write_u16(driver.avail + 2, driver.avail_idx)
    h.kick(queue)


def _nested_indirect(h: Harness, queue: int, writable: bool) -> None:
    driver = h.driver[queue]
    inner, outer = h.alloc(16, 16), h.alloc(16, 16)
    driver.write_desc(0, DATA, 16, F_WRITE if writable else 0, table=inner)
    driver.write_desc(0, inner, 16, F_INDIRECT, table=outer)
    head = driver.free.pop(0)
    driver.write_desc(head, outer, 16, F_INDIRECT)
    driver.publish(head)
    h.kick(queue)


ATTACKS: dict[str, Callable[[Harness, int, bool], None]] = {
    "outside-ram": _buffers((0x8000_0000, 64)),
    "into-a-hole": _buffers((HOLE - 8, 64)),
    "past-the-last-region": _buffers((5 * MIB - 8, 64)),
    "wraps-the-address-space": _buffers((2**64 - 8, 64)),
    "huge-length": _buffers((DATA, 0xFFFF_FFFF)),
    "many-huge-buffers": _buffers(*[(DATA, 0x8000_0000)] * 3),
    "loop": _loop,
    "bad-head": _bad_head,
    "avail-runaway": _avail_runaway,
    "nested-indirect": _nested_indirect,
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_attack(target: Target, attack: str, guarded: GuestMemory, tmp_path: Path, event_loop: EventLoop) -> None:
    device = target.make(tmp_path, event_loop)
    try:
        h = Harness(device, guarded, event_loop, sizes=[16] * len(device.queue_max_sizes)).activate()
        target.prime(device)
        ATTACKS[attack](h, target.queue, target.writable)
        wait_for(lambda: device.broken is not None, what=f"{target.name} to fail on {attack}")
        assert h.errors, "the transport was not told"
        h.close()  # driver reset
        assert device.broken is None
        fresh = Harness(device, guarded, event_loop, sizes=[16] * len(device.queue_max_sizes)).activate()
        target.valid(fresh)
        fresh.close()
    finally:
        device.close()


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_gigabyte_chain_inside_ram(target: Target, guarded: GuestMemory, tmp_path: Path,
                                   event_loop: EventLoop) -> None:
    """1000 descriptors naming the same MiB of RAM: a valid chain claiming ~1 GiB. Devices bound
    what they read or write (or refuse the request) instead of allocating or copying it all."""
    device = target.make(tmp_path, event_loop)
    try:
        h = Harness(device, guarded, event_loop, sizes=[16] * len(device.queue_max_sizes)).activate()
        target.prime(device)
        table = h.alloc(16 * 1000, 16)
        h.submit(target.queue, [(DATA, MIB, target.writable)] * 1000, indirect_table=table)
        assert h.wait_used(target.queue, timeout=10)
        assert device.broken is None
    finally:
        device.close()


# -- protocol-level hostility, per device ------------------------------------------------------


@pytest.fixture
def blk(guarded: GuestMemory, tmp_path: Path, event_loop: EventLoop) -> Iterator[Harness]:
    device = _blk(tmp_path, event_loop)
    h = Harness(device, guarded, event_loop, sizes=[16]).activate()
    yield h
    h.close()
    device.close()


def test_blk_header_in_a_writable_buffer(blk: Harness) -> None:
    status = blk.alloc(1)
    header = struct.pack("<IIQ", OUT, 0, 0)
    blk.submit(0, [(blk.alloc(16, data=header), 16, True), (blk.alloc(512), 512, True), (status, 1, True)])
    assert blk.wait_used(0)[0][1] == 1 and blk.memory.read_u8(status) == S_IOERR
    assert blk.device.broken is None


def test_blk_request_without_status_byte(blk: Harness) -> None:
    blk.submit(0, [(blk.alloc(16, data=struct.pack("<IIQ", IN, 0, 0)), 16, False), (blk.alloc(512), 512, False)])
    wait_for(lambda: blk.device.broken is not None, what="the device to fail")
    assert "status" in (blk.device.broken or "")


def test_blk_zero_length_buffers_and_a_big_status_buffer(blk: Harness) -> None:
    """Zero-length descriptors carry nothing; the status byte is the last writable byte, even of
    a large buffer, and nothing else of it is written."""
    tail = blk.alloc(4096)
    header = struct.pack("<IIQ", IN, 0, 0)
    blk.submit(0, [(blk.alloc(16, data=header), 16, False), (blk.alloc(8), 0, False), (tail, 4096, True)])
    ((_, used),) = blk.wait_used(0)
    # 4095 bytes before the status byte: not whole sectors, so IOERR and no data
    assert used == 1 and blk.memory.read_u8(tail + 4095) == S_IOERR
    assert blk.memory.read(tail, 4095) == b"\xcc" * 4095


def test_blk_data_spanning_regions(blk: Harness) -> None:
    """A data buffer that crosses from one guest region into the next (the SDK splits it)."""
    start = 2 * MIB - 256
    blk.memory.write(start, b"\x77" * 256)
    blk.memory.write(2 * MIB, b"\x77" * 256)
    header = struct.pack("<IIQ", OUT, 0, 3)
    status = blk.alloc(1)
    blk.submit(0, [(blk.alloc(16, data=header), 16, False), (start, 512, False), (status, 1, True)])
    assert blk.wait_used(0) and blk.memory.read_u8(status) == S_OK
    assert request(blk, IN, 3, in_len=512).data == b"\x77" * 512


def test_fake_tap_is_a_datagram_pipe() -> None:
    tap = FakeTap()
    try:
        tap.peer.send(b"abc")
        assert os.read(tap.fd, 100) == b"abc"
    finally:
        tap.close()
