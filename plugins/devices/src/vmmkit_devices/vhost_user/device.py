"""The virtio device whose data path is a vhost-user backend (Cloud Hypervisor's
``virtio-devices/src/vhost_user/vu_common_ctrl.rs``, QEMU's ``hw/virtio/vhost.c``).

At creation (:func:`open_backend`): connect, ``SET_OWNER``, ``GET_FEATURES`` and, when the
backend offers ``VHOST_USER_F_PROTOCOL_FEATURES``, ``GET``/``SET_PROTOCOL_FEATURES`` with the
ones vmmkit uses (``REPLY_ACK``, ``CONFIG``, ``MQ``; blk also ``INFLIGHT_SHMFD``). The guest is
offered the backend's device features within the type's mask.

At ``DRIVER_OK`` (:meth:`VhostUserDevice.activate`): ``SET_FEATURES`` (the guest's, plus bit 30
when protocol features were negotiated), ``SET_MEM_TABLE`` with every guest RAM region's memfd
(SCM_RIGHTS; ``userspace_addr`` is vmmkit's own mapping, which ring addresses are given in), then
per ready queue ``SET_VRING_NUM``, ``SET_VRING_BASE``, ``SET_VRING_ADDR``, ``SET_VRING_KICK``
(the transport's queue eventfd: the ioeventfd the hypervisor signals on the guest's notify write)
and ``SET_VRING_CALL``, then ``SET_VRING_ENABLE`` 1 when protocol features are in use (rings start
disabled then, vhost-user.rst "Ring states").

Call eventfds: one per queue, owned here and watched on the VMM's event loop, which raises the
queue's interrupt through the transport (an MSI-X vector's irqfd on PCI, the InterruptStatus bit
and line on virtio-mmio). Handing the backend the irqfd itself would skip that hop on PCI, but
MSI-X masking and virtio-mmio's status register need the transport, as QEMU's masked-notifier path.

At reset: ``GET_VRING_BASE`` per started queue (the backend stops it). A backend that hangs up
(the socket is watched on the event loop) under a running device is reconnected in the background
(client mode) and the rings resume: with ``INFLIGHT_SHMFD`` the new backend gets the in-flight
buffer back and resubmits what its predecessor had taken; without, only when the rings prove no
request was completed out of order (:mod:`.resume`), else the device fails with
``VhostUserResumeRefused``. A backend that does not come back, or misbehaves, marks the device
broken (``DEVICE_NEEDS_RESET``): the VMM and the other devices go on. When the driver resets the
device afterwards, the frontend reconnects to the same socket and negotiates again, so a restarted
backend serves the guest's next initialisation.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.errors import DeviceError, GuestMemoryError
from vmmkit.log import get_logger
from vmmkit.vhost_user import protocol as p
from vmmkit.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    ActivationContext,
    VirtioDevice,
    VirtioInterruptType,
)
from vmmkit_devices.vhost_user.connection import VhostUserConnection, VhostUserError
from vmmkit_devices.vhost_user.resume import LossObservation, VhostUserResumeRefused, check_resume, snapshot

if TYPE_CHECKING:
    from vmmkit.eventloop import EventLoop
    from vmmkit.memory import GuestMemory
    from vmmkit.virtio.queue import Virtqueue

log = get_logger()

#: Transport features a vhost-user device may offer (the rest of the backend's are dropped).
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
#: Protocol features vmmkit's frontend uses.
WANTED_PROTOCOL = p.protocol_mask(p.ProtocolFeature.REPLY_ACK, p.ProtocolFeature.CONFIG, p.ProtocolFeature.MQ)
#: What a device that tracks in-flight requests (blk) negotiates besides: only a frontend that then
#: sends SET_INFLIGHT_FD may (libvhost-user refuses to start a ring without the buffer).
INFLIGHT_PROTOCOL = p.protocol_mask(p.ProtocolFeature.INFLIGHT_SHMFD)

Opener = Callable[[], VhostUserConnection]

#: Seconds a backend lost under a running device has to come back before the device breaks.
RECONNECT_TIMEOUT = 30.0
RECONNECT_INTERVAL = 0.2


class Backend:
    """What :func:`open_backend` learnt: the connection and the backend's features."""

    def __init__(self, conn: VhostUserConnection, features: int) -> None:
        self.conn = conn
        self.features = features

    @property
    def protocol(self) -> bool:
        return bool(self.features & (1 << p.F_PROTOCOL_FEATURES))


def open_backend(opener: Opener, wanted_protocol: int = WANTED_PROTOCOL) -> Backend:
    """Connect (``opener``) and negotiate everything that does not depend on the guest."""
    conn = opener()
    try:
        conn.set_owner()
        features = conn.get_features()
        if features & (1 << p.F_PROTOCOL_FEATURES):
            conn.negotiate_protocol_features(wanted_protocol)
        return Backend(conn, features)
    except BaseException:
        conn.close()
        raise


def memory_table(memory: GuestMemory, device_id: str) -> tuple[list[p.MemoryRegion], list[int]]:
    """The SET_MEM_TABLE regions and their memfds: every region of guest RAM must be memfd-backed
    (``--memory shared=on`` or ``hugepages=on``) or a shared memory zone's file (its piece's
    offset in the file is the region's ``mmap_offset``); read-only regions without one (ROMs) are left
    out, the backend has no business there."""
    regions: list[p.MemoryRegion] = []
    fds: list[int] = []
    for region in memory.regions:
        if region.fd is None:
            if region.readonly:
                continue
            raise DeviceError(f"{device_id}: vhost-user needs guest memory the backend can map: use "
                              "--memory shared=on (or hugepages=on)")
        regions.append(p.MemoryRegion(region.start, region.size, region.host_address, region.fd_offset))
        fds.append(region.fd)
    if len(regions) > p.MAX_MEM_REGIONS:
        raise DeviceError(f"{device_id}: guest memory has {len(regions)} regions; a vhost-user memory table "
                          f"holds at most {p.MAX_MEM_REGIONS}")
    return regions, fds


class VhostUserDevice(VirtioDevice):
    """A virtio device of type ``device_type`` served by a vhost-user backend.

    :param device_id: the device's id.
    :param backend: the open backend (:func:`open_backend`); the device owns it from now on.
    :param opener: opens a new connection to the same backend (reconnection); ``None``: none.
    :param queue_sizes: the maximum size of each queue.
    :param device_features: the device-specific feature bits the guest may be offered (the
        backend's, within this mask).
    :param config: the device configuration space the guest reads (``None``: none).
    :param track_inflight: ask a backend that offers ``INFLIGHT_SHMFD`` for its in-flight
        buffer (``GET_INFLIGHT_FD``, once per activation) and hand it back (``SET_INFLIGHT_FD``)
        before the rings start and after each reconnection, so a restarted backend finds the
        requests its predecessor had taken (QEMU's vhost-user-blk).
    :param frontend_features: device feature bits the frontend implements itself (a net
        device's ``MAC`` and ``STATUS``: its configuration space is the frontend's): always
        offered, never sent to the backend.
    """

    name: ClassVar[str] = "vhost-user"

    def __init__(self, device_id: str, *, device_type: int, name: str, backend: Backend, opener: Opener | None,
                 queue_sizes: Sequence[int], device_features: int, config: bytes = b"", frontend_features: int = 0,
                 describe: Mapping[str, Any] | None = None, event_loop: EventLoop | None = None,
                 wanted_protocol: int = WANTED_PROTOCOL, track_inflight: bool = False) -> None:
        super().__init__(device_id)
        self.device_type = device_type  # type: ignore[misc]  # a ClassVar on the base: per instance here
        self.name = name  # type: ignore[misc]
        self.backend = backend
        self._opener = opener
        self._queue_sizes = tuple(queue_sizes)
        self._device_features = device_features
        self._wanted_protocol = wanted_protocol
        self._frontend_features = frontend_features
        self._offered = (backend.features & (device_features | TRANSPORT_FEATURES)) | frontend_features
        self._config = config
        self._describe = dict(describe or {})
        self._lock = threading.RLock()
        self._ctx: ActivationContext | None = None
        self._started: list[int] = []
        self._call_fds: dict[int, int] = {}  # queue index -> call eventfd
        self._paused = False
        self._track_inflight = track_inflight
        self._inflight: tuple[p.Inflight, int] | None = None
        self._loss_seen: dict[int, LossObservation] = {}  # queue index -> rings read at the backend's loss
        self._epoch = 0  # bumped by reset and close: a live reconnection of an older epoch gives up
        self._closed = False
        self._counts = {"interrupts_relayed": 0, "reconnections": 0, "backend_losses": 0, "memory_updates": 0}
        self._event_loop = event_loop
        self._watched: int | None = None
        self._watch()

    # -- the VirtioDevice interface ---------------------------------------------------------------

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return self._queue_sizes

    def features(self) -> int:
        return self._offered

    def config_space(self) -> bytes:
        return self._config

    def activate(self, ctx: ActivationContext) -> None:
        with self._lock:
            if self._closed:
                raise DeviceError(f"{self.id}: the device is closed")
            if self._lost():
                self._reconnect()
                if self.broken is not None:
                    raise DeviceError(f"{self.id}: {self.broken}")
            self._ctx = ctx
            try:
                self._start(ctx)
            except VhostUserError as exc:
                self._stop_relays(ctx)
                self._ctx = None
                raise DeviceError(str(exc)) from None
            ctx.memory.add_listener(self._memory_changed)

    def _memory_changed(self) -> None:
        """Guest RAM changed (memory hotplug) while the device runs: the backend gets the new
        table (SET_MEM_TABLE again, as QEMU does for backends without CONFIGURE_MEM_SLOTS;
        libvhost-user maps it and its rings anew). A table the backend cannot take breaks the
        device: the guest's buffers may be in the new memory."""
        with self._lock:
            ctx = self._ctx
            if ctx is None or self._lost():
                return  # the next activation (or reconnection) sends the whole table
            try:
                regions, fds = memory_table(ctx.memory, self.id)
                self.backend.conn.set_mem_table(regions, fds)
            except (DeviceError, VhostUserError) as exc:
                log.warning("vhost_user.memory_update_failed", device=self.id, error=str(exc))
                self.mark_broken(f"guest memory changed and the vhost-user backend could not follow: {exc}")
                return
            self._counts["memory_updates"] += 1
            log.info("vhost_user.memory_updated", device=self.id, regions=len(regions))

    def _start(self, ctx: ActivationContext, bases: Mapping[int, int] | None = None) -> None:
        """Hand the backend the memory and the ready queues; ``bases``: where each queue resumes
        (a live reconnection), else the queues' own positions."""
        conn = self.backend.conn
        if self._track_inflight and conn.has(p.ProtocolFeature.INFLIGHT_SHMFD):
            if self._inflight is None:
                self._inflight = conn.get_inflight_fd(len(self._queue_sizes), max(self._queue_sizes))
            conn.set_inflight_fd(*self._inflight)
        features = self.acked_features & ~self._frontend_features & self.backend.features
        features |= 1 << p.F_PROTOCOL_FEATURES if self.backend.protocol else 0
        conn.set_features(features)
        regions, fds = memory_table(ctx.memory, self.id)
        conn.set_mem_table(regions, fds)
        self._started = []
        for queue in ctx.queues:
            if not queue.ready:
                continue
            self._start_queue(conn, ctx, queue, (bases or {}).get(queue.index, queue.last_avail_idx))
        if self.backend.protocol and not self._paused:
            for index in self._started:
                conn.set_vring_enable(index, True)
        log.info("vhost_user.started", device=self.id, socket=conn.path, features=hex(features),
                 protocol_features=hex(conn.protocol_features), queues=len(self._started))

    def _start_queue(self, conn: VhostUserConnection, ctx: ActivationContext, queue: Virtqueue, base: int) -> None:
        from vmmkit.virtio.queue import ring_sizes

        index = queue.index
        desc_len, avail_len, used_len = ring_sizes(queue.size)
        memory = ctx.memory
        address = p.VringAddress(
            index, 0,
            memory.host_address(queue.desc_table, desc_len),
            memory.host_address(queue.used_ring, used_len),
            memory.host_address(queue.avail_ring, avail_len),
        )
        call_fd = self._call_fds.get(index)
        if call_fd is None:
            call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._call_fds[index] = call_fd
            ctx.event_loop.add_reader(call_fd, self._relay(ctx, index, call_fd))
        conn.set_vring_num(index, queue.size)
        conn.set_vring_base(index, base)
        conn.set_vring_addr(address)
        conn.set_vring_kick(index, ctx.queue_events[index])
        conn.set_vring_call(index, call_fd)
        self._started.append(index)

    def _relay(self, ctx: ActivationContext, index: int, fd: int) -> Callable[[], None]:
        def on_call() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            except OSError:
                ctx.event_loop.remove_reader(fd)
                return
            self._counts["interrupts_relayed"] += 1
            ctx.interrupt.trigger(VirtioInterruptType.QUEUE, index)

        return on_call

    def _watch(self) -> None:
        """Watch the connection on the event loop: a backend that hangs up (or speaks unasked)
        while the device runs breaks it; while it does not, the next activation reconnects."""
        loop, conn = self._event_loop, self.backend.conn
        if loop is None:
            return

        def on_readable() -> None:
            if not conn.peer_closed():
                return
            with self._lock:
                if self.backend.conn is not conn:
                    return
                self._unwatch()
                self._counts["backend_losses"] += 1
                reason = f"vhost-user backend at {conn.path} closed the connection"
                log.warning("vhost_user.backend_lost", device=self.id, reason=reason, active=self._ctx is not None)
                if self._ctx is not None:
                    self._observe_loss(self._ctx)
                    self._lost_while_active(reason)

        self._watched = conn.fileno()
        loop.add_reader(self._watched, on_readable)

    def _unwatch(self) -> None:
        fd, self._watched = self._watched, None
        if fd is not None and self._event_loop is not None:
            self._event_loop.remove_reader(fd)

    def _observe_loss(self, ctx: ActivationContext) -> None:
        """Read each started ring's used index, then its avail index: what became available
        after this the dead backend never took (:mod:`.resume`)."""
        self._loss_seen = {}
        for queue in ctx.queues:
            if queue.index in self._started:
                try:
                    used = ctx.memory.read_u16(queue.used_ring + 2)
                    self._loss_seen[queue.index] = LossObservation(used, ctx.memory.read_u16(queue.avail_ring + 2))
                except (GuestMemoryError, ValueError, OverflowError):
                    continue

    def _check_resume(self, ctx: ActivationContext) -> None:
        """Raise :class:`VhostUserResumeRefused` if a started ring cannot resume at its used
        index without risking a request served twice; a backend that keeps the in-flight record
        (INFLIGHT_SHMFD, the buffer handed back) resubmits what it had taken by itself."""
        if self._inflight is not None and self.backend.conn.has(p.ProtocolFeature.INFLIGHT_SHMFD):
            return
        for queue in ctx.queues:
            if queue.index not in self._started:
                continue
            ring = snapshot(ctx.memory.read_u16, ctx.memory.read_u32, size=queue.size,
                            avail_ring=queue.avail_ring, used_ring=queue.used_ring)
            try:
                check_resume(ring, self._loss_seen.get(queue.index))
            except VhostUserResumeRefused as exc:
                raise VhostUserResumeRefused(f"{self.id}: queue {queue.index}: {exc}") from None
            except (GuestMemoryError, ValueError, OverflowError) as exc:
                raise VhostUserResumeRefused(f"{self.id}: queue {queue.index}: its rings cannot be read: "
                                             f"{exc}") from None

    def _lost_while_active(self, reason: str) -> None:
        """The backend went away under a running device: reconnect in the background (client
        mode) and resume the rings where the guest's used rings say, as QEMU's vhost-user-blk
        reconnection does (``virtio_queue_restore_last_avail_idx``): requests the old backend
        took but never completed are taken again. A backend with INFLIGHT_SHMFD gets its
        predecessor's in-flight buffer back and resubmits from it; without, a ring is resumed
        only when no request can have been completed out of order (:mod:`.resume`), else the
        device fails with ``VhostUserResumeRefused``. No backend within
        :data:`RECONNECT_TIMEOUT` seconds (or server mode): the device is broken."""
        if self._opener is None:
            self.mark_broken(reason)
            return
        self._epoch += 1
        threading.Thread(target=self._reconnect_live, args=(self._epoch, reason), name=f"vhost-user-{self.id}",
                         daemon=True).start()

    def _reconnect_live(self, epoch: int, reason: str) -> None:
        assert self._opener is not None
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            time.sleep(RECONNECT_INTERVAL)
            if self._epoch != epoch or self._ctx is None:
                return
            try:
                backend = open_backend(self._opener, self._wanted_protocol)
            except VhostUserError as exc:
                last_error = str(exc)
                continue
            with self._lock:
                ctx = self._ctx
                if self._epoch != epoch or ctx is None or self._closed:
                    backend.conn.close()
                    return
                problem = self._adopt(backend)
                if problem is not None:
                    self.mark_broken(problem)
                    return
                try:
                    self._check_resume(ctx)
                except VhostUserResumeRefused as exc:
                    log.warning("vhost_user.resume_refused", device=self.id, error=str(exc))
                    self._started = []  # the new backend has no ring started
                    self.mark_broken(f"VhostUserResumeRefused: {exc}")
                    return
                started = set(self._started)
                bases = {queue.index: ctx.memory.read_u16(queue.used_ring + 2)
                         for queue in ctx.queues if queue.index in started}
                try:
                    self._start(ctx, bases)
                except (VhostUserError, DeviceError) as exc:
                    last_error = str(exc)
                    continue
                for index in self._started:  # the kicks the old backend took, and any since
                    os.eventfd_write(ctx.queue_events[index], 1)
                log.info("vhost_user.resumed", device=self.id, socket=backend.conn.path, bases=bases)
                return
        with self._lock:
            if self._epoch == epoch and self._ctx is not None:
                self.mark_broken(f"{reason}; no backend came back within {RECONNECT_TIMEOUT:.0f} s ({last_error})")

    def pause(self) -> None:
        """The VM pauses: the backend stops taking requests (SET_VRING_ENABLE 0, as Cloud
        Hypervisor's ``pause_vhost_user``). Without protocol features rings cannot be disabled
        short of stopping them; the backend then goes on serving what the guest queued."""
        with self._lock:
            self._paused = True
            self._enable_rings(False)

    def resume(self) -> None:
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            if self._enable_rings(True) and self._ctx is not None:
                for index in self._started:  # kicks that arrived while paused
                    os.eventfd_write(self._ctx.queue_events[index], 1)

    def _enable_rings(self, enable: bool) -> bool:
        if self._ctx is None or not self.backend.protocol or self._lost():
            return False
        try:
            for index in self._started:
                self.backend.conn.set_vring_enable(index, enable)
        except VhostUserError as exc:
            log.warning("vhost_user.enable_failed", device=self.id, enable=enable, error=str(exc))
            return False
        return True

    def reset(self) -> None:
        with self._lock:
            self._epoch += 1
            self._stop()
            super().reset()
            if self.broken is None and self._lost():
                self._reconnect()

    def _stop(self) -> None:
        ctx, self._ctx = self._ctx, None
        started, self._started = self._started, []
        if ctx is not None:
            ctx.memory.remove_listener(self._memory_changed)
        if not self._lost():
            try:
                for index in started:
                    self.backend.conn.get_vring_base(index)
            except VhostUserError as exc:
                log.warning("vhost_user.stop_failed", device=self.id, error=str(exc))
        self._stop_relays(ctx)
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        """A device reset: nothing is in flight any more (QEMU frees it at reset too)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            os.close(inflight[1])

    def _stop_relays(self, ctx: ActivationContext | None = None) -> None:
        ctx = ctx or self._ctx
        fds, self._call_fds = self._call_fds, {}
        for fd in fds.values():
            if ctx is not None:
                ctx.event_loop.remove_reader(fd)
            os.close(fd)

    def _lost(self) -> bool:
        return self.backend.conn.peer_closed()

    def _reconnect(self) -> None:
        """After the backend went away: connect again (a restarted backend) and negotiate; the
        features the guest was offered must still be there. Failing, the device stays broken."""
        if self._opener is None:
            self.broken = "the vhost-user backend is gone (server mode: no reconnection)"
            return
        try:
            backend = open_backend(self._opener, self._wanted_protocol)
        except VhostUserError as exc:
            self.broken = f"the vhost-user backend is gone and reconnecting failed: {exc}"
            log.warning("vhost_user.reconnect_failed", device=self.id, error=str(exc))
            return
        problem = self._adopt(backend)
        if problem is not None:
            self.broken = problem

    def _adopt(self, backend: Backend) -> str | None:
        """Take ``backend`` (a new connection) in place of the lost one; what is wrong with it
        (it lacks features the guest was offered), or ``None``."""
        if self._offered & ~self._frontend_features & ~backend.features:
            backend.conn.close()
            return (f"the restarted vhost-user backend offers features {backend.features:#x}, "
                    f"without some the guest was offered ({self._offered:#x})")
        self._unwatch()
        self.backend.conn.close()
        self.backend = backend
        self._watch()
        self._counts["reconnections"] += 1
        log.info("vhost_user.reconnected", device=self.id, socket=backend.conn.path)
        return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._epoch += 1
            self._stop()
            self._unwatch()
            self.backend.conn.close()

    def counters(self) -> Mapping[str, int]:
        return {**self._counts, "backend_calls": self.backend.conn.requests}

    def describe(self) -> Mapping[str, Any]:
        return {"vhost_user": True, "socket": self.backend.conn.path, **self._describe}

