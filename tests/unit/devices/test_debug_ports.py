"""Boot-progress port, debug console, debug exit."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import structlog
from devices_support import FakeContext
from vmmkit_devices.console.backends import NullBackend, PtyBackend
from vmmkit_devices.debug.console import DebugConsole, DebugConsoleType
from vmmkit_devices.debug.exit import DebugExit, DebugExitType
from vmmkit_devices.debug.port80 import DebugPort, DebugPortType, format_elapsed

from vmmkit.config import DebugConsoleConfig, VmConfig
from vmmkit.device import DeviceRequest


def test_progress_codes_are_logged_with_the_time_since_start() -> None:
    port = DebugPort("debug-port", start=time.monotonic() - 2.5)
    with structlog.testing.capture_logs() as logs:
        port.write(0, b"\x41")
        port.write(0, b"\x7f\x00")  # only the first byte is a code
    assert [(e["event"], e["log_level"], e["code"]) for e in logs] == [
        ("guest.progress", "info", "0x41"),
        ("guest.progress", "info", "0x7f"),
    ]
    elapsed = logs[0]["elapsed"]
    assert re.fullmatch(r"\d+\.\d{6}", elapsed)
    assert 2.5 <= float(elapsed) < 10
    assert port.counters() == {"codes": 2, "native": 0, "last_code": 0x7F}
    assert port.read(0, 1) == b"\xff"


def test_format_elapsed() -> None:
    assert format_elapsed(0) == "0.000000"
    assert format_elapsed(12.0000345) == "12.000034"
    assert format_elapsed(-1) == "0.000000"


def test_progress_port_offers_a_timestamped_sink(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    try:
        port = DebugPort("debug-port", log_fd=fd)
        (sink,) = port.port_sinks()
        assert (sink.port, sink.fd, sink.timestamp, sink.label) == (0, fd, True, "guest.progress")
        port.native_path_changed(0, True)
        assert port.counters()["native"] == 1
        port.close()
    finally:
        os.close(fd)
    default = DebugPort("debug-port")
    (sink,) = default.port_sinks()
    assert sink.fd >= 0 and sink.fd not in (0, 1, 2)  # a duplicate of stderr, closed with it
    default.close()


def test_debug_port_type(ctx: FakeContext) -> None:
    port = DebugPortType.create(ctx, DeviceRequest("debug-port", "_debug_port", pio=(0x80, 1)))
    assert port.kind == "debug-port"
    port.close()


def test_debug_console_to_a_file(ctx: FakeContext, tmp_path: Path) -> None:
    path = tmp_path / "e9.log"
    config = DebugConsoleConfig(mode="File", file=str(path))
    request = DeviceRequest("debug-console", "_debug_console", config, pio=(0xE9, 1))
    console = DebugConsoleType.create(ctx, request)
    assert isinstance(console, DebugConsole) and console.kind == "debug-console"
    assert console.read(0, 1) == b"\xe9"  # Bochs: the port reads back as 0xe9
    assert console.read(0, 2) == b"\xe9\x00"
    for byte in b"SeaBIOS\n":
        console.write(0, bytes((byte,)))
    console.write(0, b"!?")  # outw: the low byte only
    (sink,) = console.port_sinks()
    assert sink.fd == console.backend.output_fd and sink.read_value == 0xE9 and not sink.timestamp
    console.close()
    assert path.read_bytes() == b"SeaBIOS\n!"


def test_debug_console_off_is_absent(ctx: FakeContext) -> None:
    request = DeviceRequest("debug-console", "_debug_console", pio=(0xE9, 1))
    assert DebugConsoleType.create(ctx, request) is None  # VmConfig's default: Off
    ctx.config = VmConfig(debug_console=DebugConsoleConfig(mode="Null"))
    console = DebugConsoleType.create(ctx, request)
    assert console is not None and isinstance(console.backend, NullBackend)
    console.close()


def test_debug_console_pty_takes_no_input(ctx: FakeContext) -> None:
    with structlog.testing.capture_logs() as logs:
        console = DebugConsoleType.create(
            ctx, DeviceRequest("debug-console", "_dc", DebugConsoleConfig(mode="Pty"), pio=(0xE9, 1))
        )
    assert console is not None and isinstance(console.backend, PtyBackend)
    assert any(e["event"] == "debug_console.pty" for e in logs)
    assert not console.backend.has_input
    console.close()


def test_debug_exit_records_the_status(ctx: FakeContext) -> None:
    dev = DebugExitType.create(ctx, DeviceRequest("debug-exit", "_debug_exit", pio=(0xF4, 4)))
    assert isinstance(dev, DebugExit) and dev.kind == "debug-exit"
    dev.write(0, b"\x31")
    dev.write(0, (0x1234).to_bytes(4, "little"))  # outl: the low byte
    dev.write(3, b"\x07")
    assert ctx.exit_statuses == [0x31, 0x34, 0x07]
    assert ctx.shutdowns == []  # unlike QEMU, the guest keeps running
    assert dev.read(0, 4) == b"\x00" * 4
    dev.write(4, b"\x01")  # outside the range
    assert ctx.exit_statuses == [0x31, 0x34, 0x07]
    dev.reset()
    assert dev.counters() == {}
