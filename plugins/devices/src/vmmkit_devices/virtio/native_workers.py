"""What virtio-blk and virtio-net share when their queues run in C worker loops
(``native/blk_queue.c``, ``native/net_queue.c``): a wake eventfd that interrupts a worker's
``poll``, stopping the workers *before* :class:`~.common.QueueDevice`'s lifecycle waits for the
queue locks they hold, and their counters folded into the device's when a worker ends."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from vmmkit.virtio.device import ActivationContext
from vmmkit_devices.virtio.common import QueueDevice


class NativeWorker(Protocol):
    """A C queue loop as the device sees it."""

    def stop(self) -> None: ...

    def counters(self) -> Mapping[str, int]: ...

    def close(self) -> None: ...


class NativeQueueDevice(QueueDevice):
    """A :class:`QueueDevice` whose queues may be served by :class:`NativeWorker` loops;
    subclasses say which with :meth:`native_workers`."""

    def __init__(self, device_id: str, queue_sizes: Sequence[int], features: int) -> None:
        super().__init__(device_id, queue_sizes, features)
        self._wake_fd = -1
        self._folded: dict[str, int] = {}  # the counters of workers that ended

    def native_workers(self) -> Iterable[NativeWorker]:
        """The workers running now (none by default)."""
        return ()

    # -- the wake eventfd --------------------------------------------------------------------

    def _open_wake(self) -> int:
        """The wake eventfd, created on first use, with no wake-up pending."""
        if self._wake_fd < 0:
            self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._drain_wake()
        return self._wake_fd

    def _drain_wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_read(self._wake_fd)
            except OSError:
                pass

    def _close_wake(self) -> None:
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    # -- stopping and retiring workers ------------------------------------------------------

    def _stop_native(self) -> None:
        """Ask every worker to return, and wake those blocked in ``poll``."""
        for worker in list(self.native_workers()):
            worker.stop()
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _retire(self, worker: NativeWorker) -> None:
        """Keep an ending worker's counters, then free it."""
        for name, value in worker.counters().items():
            if value:
                self._folded[name] = self._folded.get(name, 0) + value
        worker.close()

    def counters(self) -> Mapping[str, int]:
        counts = dict(super().counters())
        for source in (self._folded, *(worker.counters() for worker in list(self.native_workers()))):
            for name, value in source.items():
                if value or name in counts:
                    counts[name] = counts.get(name, 0) + value
        return counts

    # -- QueueDevice's lifecycle, with the workers stopped first -----------------------------

    def activate(self, ctx: ActivationContext) -> None:
        self._stop_native()  # a re-activation tears the old ones down first
        super().activate(ctx)

    def pause(self) -> None:
        self._stop_native()
        super().pause()

    def reset(self) -> None:
        self._stop_native()
        super().reset()

    def close(self) -> None:
        self._stop_native()
        super().close()

    def mark_broken(self, reason: str) -> None:
        self._stop_native()
        super().mark_broken(reason)
