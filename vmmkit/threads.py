"""OS-level thread names (``/proc/<pid>/task/*/comm``), which orchestrators look up."""

from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_native_thread_name(name: str) -> None:
    """Name the calling OS thread (at most 15 bytes are kept by Linux)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
