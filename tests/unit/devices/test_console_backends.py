"""Console backends with real files, a real pty, a real Unix socket and a fake terminal."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import termios
import time
from pathlib import Path

import pytest
import structlog
from devices_support import FakeContext, RecordingLine, wait_for
from vmmkit_devices.console.backends import (
    NullBackend,
    PtyBackend,
    SocketBackend,
    TtyBackend,
    console_mode,
    open_backend,
)
from vmmkit_devices.legacy.serial import Serial16550, Serial16550Type

from vmmkit.config import SerialConfig
from vmmkit.device import DeviceRequest
from vmmkit.errors import DeviceError
from vmmkit.eventloop import EventLoop

THR, IER, IIR, LSR = 0, 1, 2, 5


def outb(uart: Serial16550, offset: int, value: int) -> None:
    uart.write(offset, bytes((value,)))


def inb(uart: Serial16550, offset: int) -> int:
    return uart.read(offset, 1)[0]


def send(uart: Serial16550, text: bytes) -> None:
    for byte in text:
        outb(uart, THR, byte)


def drain(uart: Serial16550) -> bytes:
    out = bytearray()
    while inb(uart, LSR) & 0x01:
        out.append(inb(uart, THR))
    return bytes(out)


def serial(ctx: FakeContext, config: SerialConfig) -> Serial16550:
    request = DeviceRequest("serial-16550", "_serial", config, pio=(0x3F8, 8), irq=4)
    device = Serial16550Type.create(ctx, request)
    assert device is not None
    return device


def test_console_mode_spellings() -> None:
    assert console_mode(SerialConfig(mode="Pty")) == "Pty"
    assert console_mode("tty") == "Tty"
    assert console_mode(None) == "Null"
    assert console_mode(None, default="Off") == "Off"
    with pytest.raises(DeviceError, match="unknown console mode"):
        console_mode("Telnet")


def test_file_output_appends(ctx: FakeContext, tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    uart = serial(ctx, SerialConfig(mode="File", file=str(path)))
    try:
        send(uart, b"new\n")
    finally:
        uart.close()
    assert path.read_bytes() == b"old\nnew\n"
    assert uart.backend.output_fd == -1  # closed


def test_file_backend_errors_are_device_errors(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot open file output"):
        open_backend("File", name="serial", file=str(tmp_path / "missing" / "x.log"))
    with pytest.raises(DeviceError, match="needs a file path"):
        open_backend("File", name="serial")


def test_pty_output_and_input(ctx: FakeContext) -> None:
    with structlog.testing.capture_logs() as logs:
        uart = serial(ctx, SerialConfig(mode="Pty"))
    try:
        backend = uart.backend
        assert isinstance(backend, PtyBackend)
        event = next(e for e in logs if e["event"] == "serial.pty")
        assert event["path"] == backend.path and event["log_level"] == "info"
        assert os.path.exists(backend.path)
        user = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            send(uart, b"login: ")
            got = b""
            while len(got) < 7:
                got += os.read(user, 64)
            assert got == b"login: "
            outb(uart, IER, 0x01)
            os.write(user, b"root\n")
            line = ctx.lines[4]
            wait_for(lambda: line.triggers, what="RX interrupt")
            received = bytearray()
            wait_for(lambda: (received.extend(drain(uart)), len(received) >= 5)[1], what="input")
            assert bytes(received) == b"root\n"  # raw: no echo, no line editing
        finally:
            os.close(user)
    finally:
        uart.close()
    assert uart.backend.output_fd == -1


def test_pty_output_nobody_reads_is_dropped() -> None:
    backend = PtyBackend("serial")
    try:
        for _ in range(2048):
            backend.write(b"x" * 64)  # far more than a pty buffers: must never block
        assert backend.tx_dropped > 0
        assert backend.tx_bytes + backend.tx_dropped == 2048 * 64
    finally:
        backend.close()


def _connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    return client


def test_socket_one_client_at_a_time(ctx: FakeContext, tmp_path: Path) -> None:
    path = tmp_path / "serial.sock"
    uart = serial(ctx, SerialConfig(mode="Socket", socket=str(path)))
    backend = uart.backend
    assert isinstance(backend, SocketBackend)
    try:
        send(uart, b"before")  # nobody connected: dropped
        assert backend.tx_dropped == 6 and backend.tx_bytes == 0
        first = _connect(path)
        wait_for(lambda: backend.connected, what="client accepted")
        send(uart, b"hello")
        assert first.recv(16) == b"hello"

        outb(uart, IER, 0x01)
        first.sendall(b"ls\n")
        wait_for(lambda: ctx.lines[4].triggers, what="RX interrupt")
        received = bytearray()
        wait_for(lambda: (received.extend(drain(uart)), len(received) >= 3)[1], what="input")
        assert bytes(received) == b"ls\n"

        second = _connect(path)
        wait_for(lambda: backend.rejected == 1, what="second client turned away")
        assert second.recv(16) == b""  # closed by the server
        second.close()

        first.close()
        wait_for(lambda: not backend.connected, what="hang-up noticed")
        send(uart, b"into the void")  # must not raise (EPIPE or /dev/null)

        third = _connect(path)
        wait_for(lambda: backend.connected, what="next client")
        send(uart, b"again")
        assert third.recv(16) == b"again"
        third.close()
    finally:
        uart.close()
    assert not path.exists()


def test_socket_replaces_a_stale_socket_but_not_a_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(stale))
    old.close()
    backend = SocketBackend("serial", str(stale))
    backend.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(DeviceError, match="not a socket"):
        open_backend("Socket", name="serial", socket_path=str(regular))
    assert regular.read_text() == "keep me"


def _read_pty(fd: int, count: int, timeout: float = 5.0) -> bytes:
    """At least ``count`` bytes from a pty master (the UART writes them one by one, so a single
    read may see only some), or what arrived before ``timeout``."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out.replace(b"\r", b"")) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if ready:
            out += os.read(fd, 16)
    return out


def test_tty_raw_mode_is_restored(event_loop: EventLoop) -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        backend = TtyBackend("serial", stdin_fd=slave, stdout_fd=slave)
        uart = Serial16550("serial0", backend, RecordingLine())
        uart.attach_input(event_loop)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert raw[1] == before[1]  # output processing untouched
        send(uart, b"out")
        assert _read_pty(master, 3).replace(b"\r", b"") == b"out"
        os.write(master, b"\x03")  # Ctrl-C goes to the guest
        wait_for(lambda: inb(uart, LSR) & 0x01, what="input")
        assert inb(uart, THR) == 3
        uart.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_tty_without_a_pollable_stdin(event_loop: EventLoop, tmp_path: Path) -> None:
    regular = tmp_path / "stdin"
    regular.write_bytes(b"")
    with open(regular, "rb") as stdin, open(tmp_path / "stdout", "wb") as stdout:
        backend = TtyBackend("serial", stdin_fd=stdin.fileno(), stdout_fd=stdout.fileno())
        uart = Serial16550("serial0", backend, RecordingLine())
        uart.attach_input(event_loop)  # epoll refuses regular files: no input, no error
        assert not backend.has_input
        send(uart, b"ok")
        uart.close()
    assert (tmp_path / "stdout").read_bytes() == b"ok"


def test_output_to_a_closed_pipe_never_raises() -> None:
    read_end, write_end = os.pipe()
    backend = TtyBackend("serial", input=False, stdout_fd=write_end)
    os.close(read_end)
    with structlog.testing.capture_logs() as logs:
        backend.write(b"a")  # EPIPE
        backend.write(b"b")  # not tried again
    assert backend.tx_dropped == 2
    assert [e["event"] for e in logs] == ["console.output_failed"]
    backend.close()
    os.close(write_end)


def test_output_to_a_full_pipe_is_dropped() -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, os.O_NONBLOCK)
    backend = TtyBackend("serial", input=False, stdout_fd=write_end)
    try:
        for _ in range(100_000):
            backend.write(b"y")
            if backend.tx_dropped:
                break
        assert backend.tx_dropped == 1  # EAGAIN: dropped, not fatal
        os.read(read_end, 65536)
        backend.write(b"z")
        assert backend.tx_dropped == 1
    finally:
        backend.close()
        os.close(read_end)
        os.close(write_end)


def test_null_backend_has_a_sink_fd() -> None:
    backend = NullBackend("serial")
    assert backend.output_fd >= 0
    backend.write(b"abc")
    assert backend.counters()["tx_bytes"] == 3
    backend.close()
    backend.close()  # idempotent


def test_input_resumes_after_the_guest_drains(event_loop: EventLoop) -> None:
    """A full UART stops the backend reading; the host keeps the rest until there is room."""
    from vmmkit_devices.legacy import serial as serial_module

    read_end, write_end = os.pipe()
    out_fd = os.open(os.devnull, os.O_WRONLY)
    backend = TtyBackend("serial", stdin_fd=read_end, stdout_fd=out_fd)
    uart = Serial16550("serial0", backend, RecordingLine())
    try:
        uart.attach_input(event_loop)
        total = serial_module.RX_BUFFER * 3
        payload = bytes(i % 251 for i in range(total))
        os.write(write_end, payload[:60000])
        got = bytearray()
        written = 60000
        while len(got) < total:
            wait_for(lambda: inb(uart, LSR) & 0x01, what="more input")
            got += drain(uart)
            if written < total:
                written += os.write(write_end, payload[written:])
        assert bytes(got) == payload
    finally:
        uart.close()
        os.close(write_end)
        os.close(read_end)
        os.close(out_fd)


def test_closed_loop_does_not_break_close(tmp_path: Path) -> None:
    loop = EventLoop()
    loop.start()
    backend = SocketBackend("serial", str(tmp_path / "s.sock"))
    uart = Serial16550("serial0", backend, RecordingLine())
    uart.attach_input(loop)
    loop.close()  # the machine closes its loop before its devices
    uart.close()
    assert not (tmp_path / "s.sock").exists()


def test_errno_of_missing_socket_dir(tmp_path: Path) -> None:
    with pytest.raises(DeviceError) as info:
        open_backend("Socket", name="serial", socket_path=str(tmp_path / "no" / "dir.sock"))
    assert os.strerror(errno.ENOENT) in str(info.value)
