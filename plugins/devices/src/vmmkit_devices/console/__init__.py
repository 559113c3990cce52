"""Console backends shared by the serial port, the debug console and (later) virtio-console."""

from vmmkit_devices.console.backends import (
    ConsoleBackend,
    FileBackend,
    InputSink,
    NullBackend,
    PtyBackend,
    SocketBackend,
    TtyBackend,
    console_mode,
    open_backend,
)

__all__ = [
    "ConsoleBackend",
    "FileBackend",
    "InputSink",
    "NullBackend",
    "PtyBackend",
    "SocketBackend",
    "TtyBackend",
    "console_mode",
    "open_backend",
]
