"""Console backends shared by the serial port, the debug console and virtio-console.

The names below come from :mod:`.backends`, imported on first use: a device type reading its
console mode (:mod:`.mode`) must not pay for the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vmmkit_devices.console import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
