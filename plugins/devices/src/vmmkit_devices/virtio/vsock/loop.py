"""The vsock device's own event loop: one thread (``<id>_mux``) that serves the device's queue
notifications and every host socket of its muxer, as Cloud Hypervisor's vsock epoll thread does.

It is a :class:`vmmkit.eventloop.EventLoop` (the device hands it to :class:`QueueDevice` in place
of the VM's loop, so queue eventfds are watched here too) that can also watch a descriptor for
writability (a host peer that stopped reading) and calls a periodic ``tick`` while one is set
(connection timeouts).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

from vmmkit.eventloop import EventLoop
from vmmkit.log import get_logger
from vmmkit.sandbox import EVENT_LOOP, enter_thread

log = get_logger()

#: A watch callback gets the epoll event mask.
Watcher = Callable[[int], None]


class MuxerLoop(EventLoop):
    """An :class:`EventLoop` with read/write watches and a periodic tick."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._watches: dict[int, tuple[int, Watcher]] = {}
        self._tick: Callable[[], None] | None = None
        self._interval = 0.25
        self._next_tick = 0.0

    # -- EventLoop ---------------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.watch(fd, select.EPOLLIN, lambda _mask: callback())

    def remove_reader(self, fd: int) -> None:
        self.unwatch(fd)

    # -- watches -----------------------------------------------------------------------------

    def watch(self, fd: int, events: int, callback: Watcher) -> None:
        """Call ``callback(mask)`` when ``fd`` has any of ``events`` (EPOLLHUP and EPOLLERR are
        always reported); replaces an existing watch of ``fd``."""
        old = self._watches.get(fd)
        self._watches[fd] = (events, callback)
        if old is None:
            self._epoll.register(fd, events)
        elif old[0] != events:
            self._epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        if self._watches.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def watching(self, fd: int) -> int | None:
        """The events ``fd`` is watched for, ``None`` when it is not."""
        watch = self._watches.get(fd)
        return None if watch is None else watch[0]

    def set_tick(self, tick: Callable[[], None] | None, interval: float = 0.25) -> None:
        """Call ``tick`` about every ``interval`` seconds on the loop thread (``None``: stop)."""
        self._tick = tick
        self._interval = interval
        self.call_soon(lambda: None)  # recompute the poll timeout

    # -- machinery ---------------------------------------------------------------------------

    def _run(self) -> None:
        enter_thread(EVENT_LOOP, self.name)
        while not self._stopping:
            timeout = -1.0
            if self._tick is not None:
                timeout = max(0.0, self._next_tick - time.monotonic())
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed under us
                return
            for fd, mask in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                watch = self._watches.get(fd)
                if watch is not None:
                    self._call(watch[1], mask)
            while self._pending:
                self._dispatch(self._pending.popleft())
            tick = self._tick
            if tick is not None and time.monotonic() >= self._next_tick:
                self._next_tick = time.monotonic() + self._interval
                self._dispatch(tick)

    def _call(self, callback: Watcher, mask: int) -> None:
        try:
            callback(mask)
        except Exception:
            log.exception("vsock.loop_callback_failed", loop=self.name)
