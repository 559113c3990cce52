"""OS-level thread names (``/proc/<pid>/task/*/comm``), which orchestrators look up."""

from __future__ import annotations

import threading


def set_native_thread_name(name: str) -> None:
    """Name the calling OS thread (Linux keeps at most 15 bytes)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "wb") as comm:
            comm.write(name.encode()[:15])
    except OSError:
        pass  # no procfs: the name is cosmetic
