"""Console modes, as Cloud Hypervisor spells them: what a device type reads from its config
section without opening anything (so without importing :mod:`.backends`)."""

from __future__ import annotations

from typing import Any

from vmmkit.errors import DeviceError

MODES = ("Off", "Pty", "Tty", "File", "Socket", "Null")


def console_mode(config: Any, default: str = "Null") -> str:
    """The console mode of a ``SerialConfig`` / ``DebugConsoleConfig`` (or a plain string), in
    CH's spelling (``"Tty"``); ``default`` when ``config`` is ``None``."""
    mode = config if isinstance(config, str) or config is None else getattr(config, "mode", None)
    if mode is None:
        return default
    mode = str(getattr(mode, "value", mode))
    for known in MODES:
        if mode.lower() == known.lower():
            return known
    raise DeviceError(f"unknown console mode {mode!r} (expected one of: {', '.join(MODES)})")
