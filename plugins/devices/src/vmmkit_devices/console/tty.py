"""Raw mode for the VMM's controlling terminal, restored on close and at interpreter exit."""

from __future__ import annotations

import atexit
import termios
import threading
from typing import Any

from vmmkit.log import get_logger

log = get_logger()

_active: list[RawMode] = []
_active_lock = threading.Lock()
_atexit_registered = False


class RawMode:
    """Put the terminal on ``fd`` in raw input mode until :meth:`restore`.

    Input is raw as with ``cfmakeraw`` (no echo, no line editing, no signals: Ctrl-C goes to the
    guest, as Cloud Hypervisor does). Output processing (``OPOST``) is left as it was, so the
    VMM's own log lines on the same terminal keep their carriage returns (QEMU does the same).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = termios.tcgetattr(fd)
        mode = termios.tcgetattr(fd)
        mode[0] &= ~(
            termios.IGNBRK
            | termios.BRKINT
            | termios.PARMRK
            | termios.ISTRIP
            | termios.INLCR
            | termios.IGNCR
            | termios.ICRNL
            | termios.IXON
        )
        mode[2] &= ~(termios.CSIZE | termios.PARENB)
        mode[2] |= termios.CS8
        mode[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        _remember(self)

    @property
    def active(self) -> bool:
        return self._saved is not None

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; errors are ignored: it may be gone)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        with _active_lock:
            if self in _active:
                _active.remove(self)
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            log.debug("tty.restore_failed", fd=self.fd)


def _remember(mode: RawMode) -> None:
    global _atexit_registered
    with _active_lock:
        _active.append(mode)
        if not _atexit_registered:
            atexit.register(restore_all)
            _atexit_registered = True


def restore_all() -> None:
    """Restore every terminal still in raw mode (registered with :mod:`atexit`)."""
    with _active_lock:
        modes = list(_active)
    for mode in reversed(modes):
        mode.restore()
