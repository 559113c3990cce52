"""The event monitor: Cloud Hypervisor's ``--event-monitor path=<file>|fd=<fd>`` stream.

Each event is one JSON object, pretty-printed and followed by an empty line, as CH's
``event_monitor`` crate writes them::

    {
      "timestamp": {
        "secs": 0,
        "nanos": 81234567
      },
      "source": "vm",
      "event": "booted",
      "properties": null
    }

``timestamp`` is the time since the monitor started (the VMM's start), ``source`` one of
``vmm``, ``vm``, ``virtio-device``, ``guest``, and ``properties`` a string-to-string map or
``null``. Read the stream with :func:`read_events`.

:class:`EventMonitor` is a :attr:`vmmkit.machine.Machine.listeners` callback: the machine's
dashed event names (``vm-booted``, ``virtio-device-activated``) become ``(source, event)``
pairs. Emitting never blocks the caller (a vCPU thread may emit): events are queued and a
writer thread (``event-monitor``) writes them.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from vmmkit.config import ConfigError, OptionParser
from vmmkit.log import get_logger
from vmmkit.paths import PathError, open_output
from vmmkit.sandbox import VMM, enter_thread

log = get_logger()

#: Event sources, longest first so that ``virtio-device-activated`` splits correctly.
SOURCES: Final = ("virtio-device", "guest", "vmm", "vm")

#: Machine event names that CH spells differently, and ones CH has no event for (``None``).
_RENAMES: Final[Mapping[str, tuple[str, str] | None]] = {
    "vm-creating": None,  # CH stores the config on vm.create and says nothing
}

_PARSER: Final = OptionParser("--event-monitor", ("path", "fd"))


def split_event(name: str) -> tuple[str, str] | None:
    """``"vm-booted"`` -> ``("vm", "booted")``; ``None`` for names no source prefixes."""
    if name in _RENAMES:
        return _RENAMES[name]
    for source in SOURCES:
        if name.startswith(source + "-") and len(name) > len(source) + 1:
            return source, name[len(source) + 1 :]
    return None


class EventMonitor:
    """Writes events to ``fd`` (owned: closed by :meth:`close`)."""

    def __init__(self, fd: int, *, start: float | None = None) -> None:
        self._fd = fd
        self._start = time.monotonic() if start is None else start
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="event-monitor", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, spec: str) -> EventMonitor:
        """From an ``--event-monitor`` value: ``path=<file>`` (created or truncated, as CH
        does) or ``fd=<n>`` (an fd inherited from the parent).

        :raises ConfigError: a malformed spec, or a file that cannot be opened.
        """
        options = _PARSER.parse(spec)
        path, fd_text = options.get("path"), options.get("fd")
        if (path is None) == (fd_text is None):
            raise ConfigError("--event-monitor", spec, "path=<file> or fd=<fd>")
        if path is not None:
            try:
                fd = open_output(path, "--event-monitor", truncate=True, mode=0o600)
            except PathError as exc:
                raise ConfigError("--event-monitor", path, "a file that can be written",
                                  reason=f"{path} {exc.reason}") from None
            os.set_blocking(fd, True)  # a FIFO with a reader: only this writer thread waits on it
            return cls(fd)
        inherited = options.integer("fd", hi=0x7FFF_FFFF)
        assert inherited is not None
        try:
            os.fstat(inherited)
        except OSError:
            raise ConfigError("--event-monitor", inherited, "an open file descriptor") from None
        return cls(inherited)

    # -- emitting ------------------------------------------------------------------------------

    def event(self, source: str, event: str, properties: Mapping[str, Any] | None = None) -> None:
        """Queue one event (thread-safe, never blocks)."""
        elapsed = max(0.0, time.monotonic() - self._start)
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": {str(k): str(v) for k, v in properties.items()} if properties else None,
        }
        if not self._closed:
            self._queue.put(json.dumps(record, indent=2).encode() + b"\n\n")

    def __call__(self, name: str, properties: dict[str, Any]) -> None:
        """A :attr:`Machine.listeners <vmmkit.machine.Machine.listeners>` callback."""
        pair = split_event(name)
        if pair is not None:
            self.event(*pair, properties)

    # -- writing ---------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        enter_thread(VMM, "event-monitor")
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                log.warning("event_monitor.write_failed", error=str(exc))

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout`` seconds), then close the fd."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        try:
            os.close(self._fd)
        except OSError:
            pass


def read_events(text: str) -> Iterator[dict[str, Any]]:
    """The events in a monitor stream (concatenated JSON objects)."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        obj, pos = decoder.raw_decode(text, pos)
        yield obj
