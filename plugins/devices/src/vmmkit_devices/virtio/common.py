"""What every virtio device of this plugin shares: activation, serving queue notifications,
pause/resume, reset and close, and the rule that the guest never crashes the VMM.

A device subclasses :class:`QueueDevice` and implements :meth:`QueueDevice.process_queue`
(pop chains, ``add_used``, :meth:`QueueDevice.signal`). The base class calls it

- on the VM's event loop when the queue's eventfd (``ActivationContext.queue_events[i]``)
  becomes readable: an ioeventfd where the hypervisor has them, otherwise written by the
  transport when the driver's notify write exits to the VMM; both look the same here;
- or, with :attr:`QueueDevice.own_threads` (virtio-blk, whose requests block on disk I/O), on one
  thread per ready queue (named ``<id>_q<i>``, as Cloud Hypervisor's) polling that eventfd.

Rules (everything from the guest is hostile):

- A :class:`~vmmkit.virtio.chain.VirtqueueError` (the driver broke the ring protocol) leaves the
  queue broken, which tells the transport (``DEVICE_NEEDS_RESET`` and a configuration
  interrupt), and the device :meth:`~VirtioDevice.mark_broken`: nothing is processed until reset.
- A request the device cannot serve gets the protocol's error status where there is one (the
  device does that itself); where there is none, the device calls :meth:`QueueDevice.fail`,
  which breaks the queue and the device the same way. So does an unexpected exception (a
  device bug), which is logged: nothing raises into the event loop, a worker thread or a vCPU.

Lifecycle (any thread): :meth:`~QueueDevice.pause` returns once no chain is being processed and
none will be until :meth:`~QueueDevice.resume`, which looks at every queue again;
:meth:`~QueueDevice.reset` stops serving (worker threads joined, readers removed), waits for the
chain in flight and calls :meth:`~QueueDevice.deactivated`, where a device forgets what it held
for the driver; :meth:`~QueueDevice.close` does the same and then :meth:`~QueueDevice.release`,
where it closes its files. Each queue has a lock held while its chains are processed; lifecycle
calls take them only after stopping new work, and processing never takes the lifecycle lock, so
a vCPU thread resetting the device cannot deadlock with the event loop.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit.sandbox import DEVICE, enter_thread
from vmmkit.virtio.chain import VirtqueueError
from vmmkit.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ActivationContext,
    VirtioDevice,
    VirtioInterruptType,
)
from vmmkit.virtio.queue import Virtqueue

log = get_logger()

#: Ring features every device here offers: the SDK's queue handles both.
RING_FEATURES: Final = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
#: How long reset/close wait for a worker thread to finish the request it is serving.
JOIN_TIMEOUT: Final = 10.0


def drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, InterruptedError, OSError):
        pass


class QueueDevice(VirtioDevice):
    """A virtio device whose work is driven by queue notifications.

    :param device_id: the device's id (``_disk0``, ``__rng``...).
    :param queue_sizes: each queue's maximum size.
    :param features: device feature bits offered (:data:`RING_FEATURES` are added).
    """

    #: Serve each ready queue on a thread of its own instead of the VM's event loop.
    own_threads: ClassVar[bool] = False

    def __init__(self, device_id: str, queue_sizes: Sequence[int], features: int) -> None:
        super().__init__(device_id)
        self._queue_sizes = tuple(queue_sizes)
        self._offered = features | RING_FEATURES
        self._ctx: ActivationContext | None = None
        self._active = False  # activated and not being torn down
        self._state = threading.RLock()
        self._queue_locks = [threading.RLock() for _ in self._queue_sizes]
        self._paused = False
        self._closed = False
        self._generation = 0
        self._threads: list[threading.Thread] = []
        self._stop_fd = -1
        self._readers: dict[int, Callable[[], None]] = {}
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = {}

    # -- VirtioDevice -----------------------------------------------------------------------

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return self._queue_sizes

    def features(self) -> int:
        return self._offered

    def ack_features(self, features: int) -> None:
        super().ack_features(features & self._offered)

    def negotiated(self, feature: int) -> bool:
        return bool(self.acked_features & feature)

    def activate(self, ctx: ActivationContext) -> None:
        with self._state:
            if self._closed:
                raise DeviceError(f"{self.id}: the device is closed")
            if len(ctx.queues) != len(self._queue_sizes) or len(ctx.queue_events) != len(self._queue_sizes):
                raise DeviceError(f"{self.id}: activated with {len(ctx.queues)} queues, "
                                  f"expected {len(self._queue_sizes)}")
            self._teardown()
            self._generation += 1
            generation = self._generation
            self._ctx = ctx
            self._active = True
            self.activated(ctx)
            if self.serves_queue_events():
                pass  # the device's own (C) thread waits on the eventfds
            elif self.own_threads:
                self._start_threads(ctx, generation)
            else:
                for index, fd in enumerate(ctx.queue_events):
                    self.add_reader(fd, self._event_callback(index, fd, generation))
            log.debug("device.activated", device=self.id, features=hex(self.acked_features),
                      queues=sum(q.ready for q in ctx.queues))
        for index in range(len(ctx.queues)):
            self.wake(index)  # buffers made available before DRIVER_OK

    def reset(self) -> None:
        with self._state:
            self._teardown()
            super().reset()

    def pause(self) -> None:
        with self._state:
            self._paused = True
            self._quiesce()
            self.paused()

    def resume(self) -> None:
        with self._state:
            if not self._paused:
                return
            self._paused = False
            self.resumed()
            ctx = self._ctx
        if ctx is not None:
            for index in range(len(ctx.queues)):
                self.wake(index)

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._teardown()
            self._closed = True
            self.release()

    def counters(self) -> Mapping[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    #: Bump in a subclass whose :meth:`device_state` layout changes.
    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The device's own state beyond its queues (the transport saves those): what
        :meth:`device_state` returns. Called while the VM is paused (no chain in flight)."""
        with self._state:
            return dict(self.device_state())

    def restore_state(self, state: Mapping[str, Any]) -> None:
        with self._state:
            self.restore_device_state(state)

    def device_state(self) -> Mapping[str, Any]:
        """A subclass's own state (default: none: the rings and the configuration say all)."""
        return {}

    def restore_device_state(self, state: Mapping[str, Any]) -> None:
        """Take :meth:`device_state`'s state (called before the device is activated again)."""

    # -- for subclasses ---------------------------------------------------------------------

    @property
    def context(self) -> ActivationContext | None:
        return self._ctx

    def running(self) -> bool:
        """Whether chains may be processed now (activated, not paused, broken or closed)."""
        return self._active and not self._paused and not self._closed and self.broken is None

    def serves_queue_events(self) -> bool:
        """Whether the device waits on its queues' eventfds itself, on a thread it started in
        :meth:`activated` (virtio-net's C queues): then they are neither watched on the event
        loop nor given threads here. Default: no."""
        return False

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        """Serve queue ``index``: pop chains while :meth:`running`, ``add_used`` each, then
        :meth:`signal`. Runs with the queue's lock held (event loop or worker thread)."""

    def activated(self, ctx: ActivationContext) -> None:
        """The driver set DRIVER_OK (before queues are served)."""

    def deactivated(self) -> None:
        """Reset or close: no chain is being processed; forget in-flight state."""

    def paused(self) -> None:
        """No chain is being processed; stop other sources (a tap, console input)."""

    def resumed(self) -> None:
        """Start other sources again (queues are looked at after this)."""

    def release(self) -> None:
        """Close host resources (the device is closed)."""

    def count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] = self._counts.get(name, 0) + amount

    def signal(self, queue: Virtqueue) -> None:
        """Interrupt the driver for the used buffers added, if it wants one."""
        ctx = self._ctx
        if ctx is not None and queue.needs_notification():
            ctx.interrupt.trigger(VirtioInterruptType.QUEUE, queue.index)

    def fail(self, queue: Virtqueue | None, reason: str) -> None:
        """The guest sent something with no error status to answer it: stop until reset, and
        have the transport tell the driver (through the queue's error hook)."""
        if self.broken is None:
            log.warning("virtio.device_broken", device=self.id, reason=reason)
        if queue is not None:
            queue.mark_broken(reason)  # first: the transport then reports the queue's error kind
        self.mark_broken(reason)

    def wake(self, index: int) -> None:
        """Look at queue ``index`` again soon (any thread)."""
        ctx = self._ctx
        if ctx is not None and not self._closed and index < len(ctx.queue_events):
            try:
                os.eventfd_write(ctx.queue_events[index], 1)
            except OSError:
                pass

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch ``fd`` on the event loop until :meth:`remove_reader` or deactivation."""
        ctx = self._ctx
        if ctx is None or not self._active or fd in self._readers:
            return
        ctx.event_loop.add_reader(fd, callback)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        ctx = self._ctx
        if self._readers.pop(fd, None) is not None and ctx is not None:
            try:
                ctx.event_loop.remove_reader(fd)
            except (OSError, ValueError):  # the loop may be closed already
                pass

    def serve(self, index: int, generation: int | None = None) -> None:
        """Process queue ``index`` now, on the calling thread, unless stale or not running."""
        with self._queue_locks[index]:
            ctx = self._ctx
            if ctx is None or (generation is not None and generation != self._generation) or not self.running():
                return
            queue = ctx.queues[index]
            if not queue.active:
                return
            try:
                self.process_queue(index, queue)
            except VirtqueueError as exc:
                self.fail(None, str(exc))  # the queue is broken already and told the transport
            except Exception as exc:  # a device bug: the VMM must keep running
                log.exception("virtio.queue_failed", device=self.id, queue=index)
                self.fail(queue, f"internal error serving queue {index}: {exc!r}")

    # -- machinery --------------------------------------------------------------------------

    def _event_callback(self, index: int, fd: int, generation: int) -> Callable[[], None]:
        def on_event() -> None:
            drain_eventfd(fd)
            self.serve(index, generation)

        return on_event

    def _start_threads(self, ctx: ActivationContext, generation: int) -> None:
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        for index, (queue, fd) in enumerate(zip(ctx.queues, ctx.queue_events, strict=True)):
            if not queue.ready:
                continue
            thread = threading.Thread(target=self._worker, args=(index, fd, self._stop_fd, generation),
                                      name=f"{self.id}_q{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _worker(self, index: int, fd: int, stop_fd: int, generation: int) -> None:
        enter_thread(DEVICE, f"{self.id}_q{index}")
        epoll = select.epoll()
        try:
            epoll.register(fd, select.EPOLLIN)
            epoll.register(stop_fd, select.EPOLLIN)
            while True:
                try:
                    events = epoll.poll()
                except InterruptedError:
                    continue
                if any(ready == stop_fd for ready, _ in events) or generation != self._generation:
                    return
                drain_eventfd(fd)
                self.serve(index, generation)
        except Exception:
            log.exception("virtio.worker_failed", device=self.id, queue=index)
        finally:
            epoll.close()

    def _quiesce(self) -> None:
        """Wait for the chains being processed (callers stopped new work first)."""
        for lock in self._queue_locks:
            with lock:
                pass

    def _teardown(self) -> None:
        """Stop serving, wait for in-flight work, forget the activation (state lock held)."""
        self._generation += 1  # callbacks and threads of the old activation become no-ops
        self._active = False
        for fd in list(self._readers):
            self.remove_reader(fd)
        if self._threads:
            try:
                os.eventfd_write(self._stop_fd, 1)
            except OSError:
                pass
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(JOIN_TIMEOUT)
                    if thread.is_alive():
                        log.warning("virtio.worker_stuck", device=self.id, thread=thread.name)
            self._threads = []
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._quiesce()
        for fd in list(self._readers):  # re-armed by a chain that was in flight
            self.remove_reader(fd)
        if self._ctx is not None:
            try:
                self.deactivated()
            except Exception:
                log.exception("virtio.deactivate_failed", device=self.id)
        self._ctx = None
