"""virtio-console on the serial port's real backends: a pty (both directions), a file, a
socket, null; the receive buffer, emergency writes, hostile chains."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from virtio_driver import Harness, wait_for
from vmmkit_devices.console.backends import FileBackend, NullBackend
from vmmkit_devices.virtio.console import (
    CONFIG,
    MAX_TX_CHAIN,
    RX_BUFFER,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_SIZE,
    ConsoleDevice,
    VirtioConsoleType,
)

from vmmkit.config import ConsoleConfig, VmConfig
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop

RX, TX = 0, 1


def send(h: Harness, text: bytes, pieces: int = 1) -> None:
    size = -(-len(text) // pieces)
    buffers = [(h.alloc(len(part), data=part), len(part), False)
               for part in (text[i : i + size] for i in range(0, len(text), size))]
    h.submit(TX, buffers)


def post_rx(h: Harness, count: int, size: int = 64) -> dict[int, int]:
    heads = {}
    for _ in range(count):
        gpa = h.alloc(size)
        heads[h.driver[RX].add([(gpa, size, True)])] = gpa
    h.kick(RX)
    return heads


def read_rx(h: Harness, heads: dict[int, int], count: int = 1) -> bytes:
    return b"".join(h.memory.read(heads[head], length) for head, length in h.wait_used(RX, count))


def read_fd(fd: int, want: int, timeout: float = 5.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < want:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"got {out!r}, wanted {want} bytes")
        out += os.read(fd, want - len(out))
    return out


def test_pty_both_ways(event_loop: EventLoop, activate: Callable[..., Harness]) -> None:
    device = ConsoleDevice.from_config("__console", ConsoleConfig(mode="Pty"), event_loop)
    path = device.describe()["path"]
    assert path and path.startswith("/dev/pts/")
    user = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        h = activate(device, sizes=[16, 16])
        send(h, b"hello from the guest\n", pieces=3)
        assert read_fd(user, 21) == b"hello from the guest\n"
        assert h.wait_used(TX) and device.counters()["tx_bytes"] == 21

        heads = post_rx(h, 2, size=8)
        os.write(user, b"typed!")
        assert read_rx(h, heads) == b"typed!"
        os.write(user, b"0123456789")  # more than one buffer holds: the rest waits
        assert read_rx(h, heads) == b"01234567"
        more = post_rx(h, 1, size=8)
        assert read_rx(h, more) == b"89"
        assert device.counters()["rx_bytes"] == 16
    finally:
        os.close(user)


def test_input_before_the_driver_is_kept(event_loop: EventLoop, activate: Callable[..., Harness]) -> None:
    device = ConsoleDevice.from_config("__console", ConsoleConfig(mode="Pty"), event_loop)
    user = os.open(device.describe()["path"], os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(user, b"early")
        wait_for(lambda: device.counters()["rx_pending"] == 5, what="input to be buffered")
        h = activate(device, sizes=[16, 16])
        assert read_rx(h, post_rx(h, 1)) == b"early"
    finally:
        os.close(user)


def test_file_output_and_emergency_write(tmp_path: Path, event_loop: EventLoop,
                                         activate: Callable[..., Harness]) -> None:
    log = tmp_path / "console.log"
    device = ConsoleDevice.from_config("__console", ConsoleConfig(mode="File", file=str(log)), event_loop)
    assert device.features() & VIRTIO_CONSOLE_F_EMERG_WRITE and not device.features() & VIRTIO_CONSOLE_F_SIZE
    assert CONFIG.unpack(device.config_space()) == (0, 0, 1, 0)
    device.write_config(8, (ord("!")).to_bytes(4, "little"))  # emerg_wr, before any queue
    h = activate(device, sizes=[16, 16])
    send(h, b"line one\n")
    send(h, b"line two\n")
    assert len(h.wait_used(TX, 2)) == 2
    assert log.read_bytes() == b"!line one\nline two\n"


def test_socket_backend(tmp_path: Path, event_loop: EventLoop, activate: Callable[..., Harness]) -> None:
    path = tmp_path / "console.sock"
    device = ConsoleDevice.from_config("__console", ConsoleConfig(mode="Socket", socket=str(path)), event_loop)
    h = activate(device, sizes=[16, 16])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    client.settimeout(5)
    try:
        wait_for(lambda: device.backend.connected, what="the client to be accepted")  # type: ignore[attr-defined]
        send(h, b"to the socket")
        assert client.recv(100) == b"to the socket"
        heads = post_rx(h, 1)
        client.send(b"from the socket")
        assert read_rx(h, heads) == b"from the socket"
    finally:
        client.close()


def test_huge_transmit_chain_is_bounded(event_loop: EventLoop, activate: Callable[..., Harness]) -> None:
    device = ConsoleDevice("__console", NullBackend("virtio_console"), event_loop)
    h = activate(device, sizes=[16, 16])
    gpa = h.alloc(1 << 20)
    h.submit(TX, [(gpa, 1 << 20, False)] * 4)  # 4 MiB claimed, 1 MiB of it read
    assert h.wait_used(TX)
    counters = device.counters()
    assert counters["tx_bytes"] == MAX_TX_CHAIN and counters["tx_dropped"] == 3 * MAX_TX_CHAIN


def test_receive_buffer_fills_and_backend_waits(event_loop: EventLoop) -> None:
    device = ConsoleDevice("__console", NullBackend("virtio_console"), event_loop)
    try:
        assert device.room() == RX_BUFFER
        device.receive(b"x" * (RX_BUFFER + 10))
        assert device.room() == 0 and device.counters()["rx_pending"] == RX_BUFFER
        device.pause()
        assert device.room() == 0
    finally:
        device.close()


def test_hostile_receive_chain(event_loop: EventLoop, activate: Callable[..., Harness]) -> None:
    device = ConsoleDevice("__console", NullBackend("virtio_console"), event_loop)
    h = activate(device, sizes=[16, 16])
    h.submit(RX, [(h.alloc(16), 16, False)])  # nothing the device may write
    device.receive(b"input")
    wait_for(lambda: device.broken is not None, what="the device to fail")
    assert h.errors
    h.close()  # reset clears it; buffered input survives for the next driver
    h2 = activate(device, sizes=[16, 16])
    assert device.broken is None
    assert read_rx(h2, post_rx(h2, 1)) == b"input"


def test_writable_transmit_buffers_are_ignored(tmp_path: Path, event_loop: EventLoop,
                                               activate: Callable[..., Harness]) -> None:
    log = tmp_path / "out"
    device = ConsoleDevice("__console", FileBackend("virtio_console", str(log)), event_loop)
    h = activate(device, sizes=[16, 16])
    h.submit(TX, [(h.alloc(3, data=b"abc"), 3, False), (h.alloc(10), 10, True)])
    assert h.wait_used(TX) == [(0, 0)]
    assert log.read_bytes() == b"abc"


def test_requests() -> None:
    assert VirtioConsoleType.requests(VmConfig()) == []  # vmmkit's default: off
    (request,) = VirtioConsoleType.requests(VmConfig(console=ConsoleConfig(mode="Null", transport="mmio")))
    assert (request.type, request.id, request.transport) == ("virtio-console", "__console", "mmio")
    with pytest.raises(DeviceError, match="off"):
        ConsoleDevice.from_config("__console", ConsoleConfig(mode="Off"), None)
