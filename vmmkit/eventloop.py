"""The VM's event loop: one thread, epoll over eventfds, tap fds, sockets and ttys.

Devices register callbacks for readable file descriptors (queue notifications arrive as
ioeventfds) and may post work from any thread with :meth:`EventLoop.call_soon`.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable

from vmmkit.log import get_logger
from vmmkit.sandbox import EVENT_LOOP, enter_thread

log = get_logger()

Callback = Callable[[], None]


class EventLoop:
    def __init__(self, name: str = "vmm-events") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._pending: deque[Callback] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` on the loop thread whenever ``fd`` is readable."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop thread (thread-safe)."""
        self._pending.append(callback)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        os.close(self._wake)

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        enter_thread(EVENT_LOOP, self.name)
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                callback = self._callbacks.get(fd)
                if callback is not None:
                    self._dispatch(callback)
            while self._pending:
                self._dispatch(self._pending.popleft())

    def _dispatch(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:
            log.exception("eventloop.callback_failed", callback=repr(callback))
