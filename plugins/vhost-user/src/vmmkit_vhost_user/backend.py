"""The backend side of vhost-user (QEMU's ``docs/interop/vhost-user.rst``): a Unix socket
server that accepts one frontend at a time, follows its messages, and serves the device's
split virtqueues from the frontend's shared memory.

The message codec is the core's :mod:`vmmkit.vhost_user.protocol`. The rings are the core's
:class:`vmmkit.virtio.queue.Virtqueue` over the mapped memory table
(:class:`~vmmkit_vhost_user.memory.FrontendMemory`): descriptor addresses, lengths, indices and
ring placement are checked there, as for vmmkit's own devices. SET_VRING_ADDR's addresses are
the frontend's virtual addresses, turned into guest-physical ones through the memory table
(bounds-checked); a ring that does not lie inside one region is refused.

Ring life cycle, as the spec has it: a ring *starts* with SET_VRING_KICK and *stops* with
GET_VRING_BASE (which answers the next available index); when ``VHOST_USER_F_PROTOCOL_FEATURES``
is negotiated a ring begins disabled until SET_VRING_ENABLE. Requests are served only while
started and enabled. A guest that breaks a ring's protocol gets that ring stopped, and the
frontend hears of it on the ring's error eventfd (SET_VRING_ERR) when it gave one. When the
frontend hangs up (or breaks the vhost-user protocol) everything is dropped: mappings,
eventfds, the device's state; and the next frontend is accepted.

A device may drive some rings itself (:class:`RingDriver`: net's receive queues, filled when
a frame arrives on the tap, not when the guest kicks): the backend then tells it when such a ring
is kicked, started or stopped, hands it a :class:`DrivenRing` to pop chains and publish
completions, and watches the device's own descriptors in its loop (:meth:`Backend.watch`).

One thread runs the loop (``selectors`` over the listening socket, the connection and the kick
eventfds); with ``thread_pool_size`` > 0 the requests themselves run on a pool of that many
threads (virtiofsd's ``--thread-pool-size``), each completing its chain under the ring's lock.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req
from vmmkit.vhost_user.protocol import ProtocolFeature as PF
from vmmkit.virtio.chain import MAX_QUEUE_SIZE, DescriptorChain, ErrorKind, VirtqueueError
from vmmkit.virtio.queue import Virtqueue, ring_sizes
from vmmkit_vhost_user.inflight import InflightBuffer, InflightError, InflightQueue, allocate
from vmmkit_vhost_user.memory import FrontendMemory

log = logging.getLogger("vmmkit_vhost_user")

VIRTIO_F_VERSION_1: Final = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC: Final = 1 << 28
VIRTIO_RING_F_EVENT_IDX: Final = 1 << 29
F_PROTOCOL_FEATURES: Final = 1 << vu.F_PROTOCOL_FEATURES


class Device(Protocol):
    """What a backend serves: its queues, config space, and one request at a time."""

    name: str
    num_queues: int
    #: Offer INFLIGHT_SHMFD: record the chains taken, so a restarted backend resubmits them.
    inflight: bool

    def device_features(self) -> int: ...

    def set_features(self, features: int) -> None:
        """The features the frontend acknowledged (SET_FEATURES)."""

    def config(self) -> bytes | None:
        """The device's config space (``None``: the backend does not offer CONFIG)."""

    def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one chain; the bytes written into it. May raise :class:`VirtqueueError`."""

    def reset(self) -> None:
        """The frontend went away or reset the device: forget its state."""


class DrivenRing:
    """A started ring as a :class:`RingDriver` sees it: the backend's virtqueue (pop, undo_pop,
    enable_notification...), and the completions that signal the frontend."""

    def __init__(self, backend: Backend, vring: Vring, queue: Virtqueue) -> None:
        self._backend, self._vring, self.queue = backend, vring, queue

    @property
    def index(self) -> int:
        return self._vring.index

    @property
    def usable(self) -> bool:
        """Started (still this queue), enabled and not broken."""
        vring = self._vring
        return vring.queue is self.queue and vring.enabled and self.queue.active

    def complete(self, used: Sequence[tuple[int, int]]) -> None:
        """Publish ``(head, written)`` completions and signal the frontend if the driver wants it
        (``VIRTQ_AVAIL_F_NO_INTERRUPT``, or ``used_event`` with ``EVENT_IDX``)."""
        if not used:
            return
        vring = self._vring
        with vring.lock:
            try:
                for head, written in used:
                    self.queue.add_used(head, written)
                notify = self.queue.needs_notification()
            except VirtqueueError as exc:
                self._backend._ring_broken(vring, exc)
                return
            if notify and vring.call is not None:
                os.eventfd_write(vring.call, 1)

    def broken(self, exc: VirtqueueError) -> None:
        """The guest broke this ring's protocol: stop it and tell the frontend (its err eventfd)."""
        self._backend._ring_broken(self._vring, exc)


class RingDriver(Protocol):
    """A :class:`Device` that serves some rings on its own events (``Device.drives``)."""

    def attach(self, backend: Backend) -> None:
        """The backend serving the device (its loop watches the device's descriptors)."""

    def drives(self, queue_index: int) -> bool:
        """Whether the device pops this ring itself (the backend then never calls ``handle`` for it)."""

    def ring_kicked(self, ring: DrivenRing) -> None:
        """The ring is started and enabled, and the guest may have made chains available."""

    def ring_stopped(self, queue_index: int) -> None:
        """The ring stops or is disabled: let it go (rewinding chains popped and not used, so
        GET_VRING_BASE hands them back)."""


class Vring:
    """One ring's vhost-user state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.RLock()  #: completions, and the call/err eventfds they signal
        self.size = 0
        self.address: vu.VringAddress | None = None
        self.base = 0
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.queue: Virtqueue | None = None
        self.inflight: set[concurrent.futures.Future[None]] = set()
        self.inflight_lock = threading.Lock()
        #: This ring's part of the in-flight record (SET_INFLIGHT_FD), and the chains to resubmit.
        self.record: InflightQueue | None = None
        self.resubmit: list[int] = []

    def track(self, future: concurrent.futures.Future[None]) -> None:
        """Remember a request running on the pool until it is done."""
        with self.inflight_lock:
            self.inflight.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[None]) -> None:
        with self.inflight_lock:
            self.inflight.discard(future)

    def wait_inflight(self) -> None:
        with self.inflight_lock:
            pending = list(self.inflight)
        concurrent.futures.wait(pending)

    @property
    def started(self) -> bool:
        return self.queue is not None

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


class ProtocolFailure(Exception):
    """A request the backend refuses (a nack with REPLY_ACK, else the connection ends)."""


class Backend:
    """Serve ``device`` to frontends connecting to ``socket_path``."""

    def __init__(self, device: Device, socket_path: str, *, thread_pool_size: int = 0) -> None:
        self.device = device
        self.socket_path = socket_path
        self.pool = (concurrent.futures.ThreadPoolExecutor(thread_pool_size, thread_name_prefix="vu-req")
                     if thread_pool_size > 0 else None)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(socket_path)
        self.listener.listen(1)
        self.selector = selectors.DefaultSelector()
        self.connection: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.frontends_served = 0
        drives = getattr(device, "drives", None)
        self.driver: RingDriver | None = device if callable(drives) else None  # type: ignore[assignment]
        if self.driver is not None:
            self.driver.attach(self)
        self._reset_state()

    def _reset_state(self) -> None:
        self.owner = False
        self.acked_features = 0
        self.acked_protocol = 0
        self.memory: FrontendMemory | None = None
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.inflight: InflightBuffer | None = None
        self.reply_fds: list[int] = []  # descriptors the reply being built carries (GET_INFLIGHT_FD)

    # -- features --------------------------------------------------------------------------------

    def features(self) -> int:
        return (self.device.device_features() | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
                | VIRTIO_RING_F_EVENT_IDX | F_PROTOCOL_FEATURES)

    def protocol_features(self) -> int:
        mask = vu.protocol_mask(PF.MQ, PF.REPLY_ACK, PF.RESET_DEVICE)
        if self.device.config() is not None:
            mask |= vu.protocol_mask(PF.CONFIG)
        if self.device.inflight:
            mask |= vu.protocol_mask(PF.INFLIGHT_SHMFD)
        return mask

    # -- the loop --------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept frontends one after another until :meth:`stop`."""
        self.selector.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self.selector.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        log.info("%s: listening on %s", self.device.name, self.socket_path)
        while True:
            for key, _events in self.selector.select():
                kind, index = key.data
                if kind == "stop":
                    self._disconnect("stopping")
                    return
                if kind == "listen":
                    self._accept()
                elif kind == "message":
                    self._on_message()
                elif kind == "kick" and isinstance(index, int):
                    self._on_kick(index)
                elif kind == "watch" and callable(index):
                    try:
                        index()
                    except Exception:  # a bug: that descriptor is no longer watched, the daemon goes on
                        log.exception("%s: serving descriptor %d failed", self.device.name, key.fd)
                        self.unwatch(key.fd)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop while ``fd`` is readable (a :class:`RingDriver`'s tap)."""
        try:
            self.selector.register(fd, selectors.EVENT_READ, ("watch", callback))
        except KeyError:
            self.selector.modify(fd, selectors.EVENT_READ, ("watch", callback))

    def unwatch(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _driven(self, index: int) -> RingDriver | None:
        driver = self.driver
        return driver if driver is not None and driver.drives(index) else None

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (from a signal handler or another thread)."""
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._disconnect("closing")
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.selector.close()
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _accept(self) -> None:
        connection, _ = self.listener.accept()
        connection.set_inheritable(False)
        self.connection = connection
        self.selector.unregister(self.listener)  # one frontend at a time
        self.selector.register(connection, selectors.EVENT_READ, ("message", None))
        self.frontends_served += 1
        log.info("%s: frontend connected", self.device.name)

    def _disconnect(self, why: str) -> None:
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.close_fds()
        if self.memory is not None:
            self.memory.close()
        self._drop_inflight()
        self.device.reset()
        self._reset_state()
        if self.connection is not None:
            log.info("%s: frontend gone (%s); waiting for the next one", self.device.name, why)
            self.selector.unregister(self.connection)
            self.connection.close()
            self.connection = None
            if why not in ("stopping", "closing"):
                self.selector.register(self.listener, selectors.EVENT_READ, ("listen", None))

    # -- messages --------------------------------------------------------------------------------

    def _on_message(self) -> None:
        assert self.connection is not None
        try:
            message, fds = vu.recv(self.connection)
        except vu.VhostUserDisconnected as exc:
            self._disconnect(str(exc))
            return
        except (vu.VhostUserProtocolError, OSError) as exc:
            self._disconnect(f"protocol error: {exc}")
            return
        log.debug("%s: %s (%d bytes, %d descriptors)", self.device.name, _name(message.request),
                  len(message.payload), len(fds))
        try:
            reply = self._dispatch(message, fds)
        except (ProtocolFailure, vu.VhostUserProtocolError) as exc:
            for fd in fds:
                os.close(fd)
            if message.need_reply and self.acked_protocol & vu.protocol_mask(PF.REPLY_ACK):
                log.warning("%s: refused %s: %s", self.device.name, _name(message.request), exc)
                self._send(message.reply(vu.pack_u64(1)))
                return
            self._disconnect(f"{_name(message.request)}: {exc}")
            return
        except Exception:  # a bug: this frontend is dropped, the daemon serves the next one
            log.exception("%s: %s failed", self.device.name, _name(message.request))
            for fd in fds:
                os.close(fd)
            self._disconnect("internal error")
            return
        for fd in fds:  # descriptors a request does not take
            os.close(fd)
        if reply is not None:
            reply_fds, self.reply_fds = self.reply_fds, []
            try:
                self._send(message.reply(reply), reply_fds)
            finally:
                for fd in reply_fds:
                    os.close(fd)
        elif message.need_reply and self.acked_protocol & vu.protocol_mask(PF.REPLY_ACK):
            self._send(message.reply(vu.pack_u64(0)))

    def _send(self, message: vu.Message, fds: list[int] | None = None) -> None:
        if self.connection is None:
            return
        try:
            vu.send(self.connection, message, fds or ())
        except (vu.VhostUserProtocolError, OSError) as exc:
            self._disconnect(str(exc))

    def _dispatch(self, message: vu.Message, fds: list[int]) -> bytes | None:
        """The reply payload (for the requests that have one), else ``None``. A handler that
        takes the descriptors (keeps or closes them) empties ``fds``; the caller closes the rest."""
        request, payload = message.request, message.payload
        takes_fd = request in (Req.SET_MEM_TABLE, Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR,
                               Req.SET_INFLIGHT_FD)
        if fds and not takes_fd:
            raise ProtocolFailure(f"{len(fds)} unexpected descriptors")
        if request != Req.SET_OWNER and request not in _BEFORE_OWNER and not self.owner:
            raise ProtocolFailure("before SET_OWNER")
        handler = self._handlers().get(request)
        if handler is None:
            raise ProtocolFailure("not supported by this backend")
        return handler(payload, fds)

    def _handlers(self) -> dict[int, Callable[[bytes, list[int]], bytes | None]]:
        return {
            Req.GET_FEATURES: lambda p, f: vu.pack_u64(self.features()),
            Req.SET_FEATURES: self._set_features,
            Req.GET_PROTOCOL_FEATURES: lambda p, f: vu.pack_u64(self.protocol_features()),
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_owner,
            Req.RESET_DEVICE: self._reset_owner,
            Req.GET_QUEUE_NUM: lambda p, f: vu.pack_u64(self.device.num_queues),
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: self._set_vring_kick,
            Req.SET_VRING_CALL: self._set_vring_call,
            Req.SET_VRING_ERR: self._set_vring_err,
            Req.SET_VRING_ENABLE: self._set_vring_enable,
            Req.GET_CONFIG: self._get_config,
            Req.SET_CONFIG: self._set_config,
            Req.GET_INFLIGHT_FD: self._get_inflight_fd,
            Req.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    def _set_features(self, payload: bytes, fds: list[int]) -> None:
        features = vu.unpack_u64(payload)
        if features & ~self.features():
            raise ProtocolFailure(f"features {features & ~self.features():#x} were not offered")
        self.acked_features = features
        self.device.set_features(features)
        for vring in self.vrings:
            if vring.queue is not None:
                vring.queue.set_features(features)

    def _set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        features = vu.unpack_u64(payload)
        if features & ~self.protocol_features():
            raise ProtocolFailure(f"protocol features {features & ~self.protocol_features():#x} were not offered")
        self.acked_protocol = features

    def _set_owner(self, payload: bytes, fds: list[int]) -> None:
        if payload:
            raise ProtocolFailure("SET_OWNER carries no payload")
        self.owner = True

    def _reset_owner(self, payload: bytes, fds: list[int]) -> None:
        for vring in self.vrings:
            self._stop_ring(vring)
            vring.close_fds()
        if self.memory is not None:
            self.memory.close()
        self._drop_inflight()
        self.device.reset()
        owner, protocol = self.owner, self.acked_protocol
        self._reset_state()
        self.owner, self.acked_protocol = owner, protocol

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        regions = vu.unpack_memory_table(payload)
        memory = FrontendMemory(regions, fds)
        for fd in fds:
            os.close(fd)  # the mappings stay
        fds.clear()
        old, self.memory = self.memory, memory
        for vring in self.vrings:  # a running ring moves to the new table
            if vring.queue is not None:
                next_used = vring.queue.next_used
                last_avail = self._stop_ring(vring)
                kick, vring.kick = vring.kick, None
                assert kick is not None
                try:
                    self._start_ring(vring, kick, last_avail, next_used)
                except ProtocolFailure:
                    os.close(kick)
                    raise
        if old is not None:
            old.close()
        log.info("%s: memory table of %d regions", self.device.name, len(regions))

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolFailure(f"ring {index} does not exist ({len(self.vrings)} rings)")
        return self.vrings[index]

    def _set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        state = vu.VringState.unpack(payload)
        vring = self._vring(state.index)
        if not 1 <= state.num <= MAX_QUEUE_SIZE or state.num & (state.num - 1):
            raise ProtocolFailure(f"ring size {state.num} is not a power of two <= {MAX_QUEUE_SIZE}")
        vring.size = state.num

    def _set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        address = vu.VringAddress.unpack(payload)
        vring = self._vring(address.index)
        if address.flags & ~1:  # VHOST_VRING_F_LOG
            raise ProtocolFailure(f"vring address flags {address.flags:#x}")
        vring.address = address

    def _set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        state = vu.VringState.unpack(payload)
        vring = self._vring(state.index)
        if state.num > 0xFFFF:
            raise ProtocolFailure(f"ring base {state.num} is not a 16-bit index")
        vring.base = state.num

    def _get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        state = vu.VringState.unpack(payload)
        vring = self._vring(state.index)
        base = self._stop_ring(vring)
        if vring.kick is not None:
            os.close(vring.kick)
            vring.kick = None
        return vu.VringState(state.index, base).pack()

    def _vring_fd(self, payload: bytes, fds: list[int]) -> tuple[Vring, int | None]:
        index, no_fd = vu.unpack_vring_file(payload)
        if len(fds) != (0 if no_fd else 1):
            raise ProtocolFailure(f"{len(fds)} descriptors where {'none' if no_fd else 'one'} belongs")
        return self._vring(index), (None if no_fd else fds[0])

    def _set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_fd(payload, fds)
        if fd is None:
            raise ProtocolFailure("polling a ring without a kick eventfd is not supported")
        self._stop_ring(vring)
        if vring.kick is not None:
            os.close(vring.kick)
            vring.kick = None
        self._start_ring(vring, fd, vring.base, vring.base)
        fds.clear()

    def _set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_fd(payload, fds)
        with vring.lock:
            if vring.call is not None:
                os.close(vring.call)
            vring.call = fd
        fds.clear()

    def _set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_fd(payload, fds)
        with vring.lock:
            if vring.err is not None:
                os.close(vring.err)
            vring.err = fd
        fds.clear()

    def _set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        state = vu.VringState.unpack(payload)
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise ProtocolFailure(f"SET_VRING_ENABLE {state.num}")
        vring.enabled = bool(state.num)
        driver = self._driven(vring.index)
        if not vring.enabled and driver is not None and vring.queue is not None:
            driver.ring_stopped(vring.index)
        if vring.enabled and vring.queue is not None:
            self._on_kick(vring.index, drain_only=True)  # chains may be waiting already

    def _get_config(self, payload: bytes, fds: list[int]) -> bytes:
        request = vu.ConfigSpace.unpack(payload)
        space = self.device.config()
        if space is None or request.offset + request.size > len(space):
            raise ProtocolFailure(f"config {request.offset}+{request.size} out of the device's config space")
        data = space[request.offset:request.offset + request.size]
        return vu.ConfigSpace(request.offset, request.size, request.flags, data).pack()

    def _set_config(self, payload: bytes, fds: list[int]) -> None:
        vu.ConfigSpace.unpack(payload)
        raise ProtocolFailure("the config space is read-only")

    # -- the in-flight record (inflight.py) -------------------------------------------------------

    def _inflight_negotiated(self) -> bool:
        return bool(self.acked_protocol & vu.protocol_mask(PF.INFLIGHT_SHMFD))

    def _get_inflight_fd(self, payload: bytes, fds: list[int]) -> bytes:
        if not self._inflight_negotiated():
            raise ProtocolFailure("INFLIGHT_SHMFD was not negotiated")
        asked = vu.Inflight.unpack(payload)
        if asked.num_queues > self.device.num_queues:
            raise ProtocolFailure(f"inflight buffer for {asked.num_queues} queues (the device has "
                                  f"{self.device.num_queues})")
        try:
            info, fd = allocate(asked.num_queues, asked.queue_size)
        except InflightError as exc:
            raise ProtocolFailure(str(exc)) from None
        self.reply_fds = [fd]
        return info.pack()

    def _set_inflight_fd(self, payload: bytes, fds: list[int]) -> None:
        if not self._inflight_negotiated():
            raise ProtocolFailure("INFLIGHT_SHMFD was not negotiated")
        info = vu.Inflight.unpack(payload)
        if len(fds) != 1:
            raise ProtocolFailure(f"SET_INFLIGHT_FD with {len(fds)} descriptors")
        try:
            buffer = InflightBuffer(fds[0], info, self.device.num_queues)
        except InflightError as exc:
            raise ProtocolFailure(str(exc)) from None
        self._drop_inflight()
        self.inflight = buffer
        for vring, record in zip(self.vrings, buffer.queues, strict=False):
            vring.record = record
        log.info("%s: in-flight record of %d bytes for %d queues of %d", self.device.name, info.mmap_size,
                 info.num_queues, info.queue_size)

    def _drop_inflight(self) -> None:
        buffer, self.inflight = self.inflight, None
        for vring in self.vrings:
            vring.record, vring.resubmit = None, []
        if buffer is not None:
            buffer.close()

    def _recover(self, vring: Vring, queue: Virtqueue) -> None:
        """A ring starting on an in-flight record: resubmit what the previous backend had taken
        and not completed, and take new chains after them (libvhost-user's
        ``vu_check_queue_inflights``)."""
        record = vring.record
        if record is None:
            return
        used_idx = queue.memory.read_u16(queue.used_ring + 2)
        try:
            heads = record.recover(used_idx, queue.size)
        except InflightError as exc:
            raise ProtocolFailure(f"ring {vring.index}: {exc}") from None
        if heads is None:
            return
        queue.next_used = used_idx
        queue.last_avail_idx = (used_idx + len(heads)) & 0xFFFF
        vring.resubmit = heads
        if heads:
            log.info("%s: ring %d: resubmitting %d chains the previous backend had taken", self.device.name,
                     vring.index, len(heads))

    # -- rings -----------------------------------------------------------------------------------

    def _start_ring(self, vring: Vring, kick: int, last_avail: int, next_used: int) -> None:
        """Start ``vring`` with its ``kick`` eventfd (kept only if the ring starts)."""
        if not vring.enabled and not self.acked_features & F_PROTOCOL_FEATURES:
            vring.enabled = True  # without protocol features a ring starts enabled
        if self.memory is None or vring.address is None or vring.size == 0:
            raise ProtocolFailure(f"ring {vring.index} started before its memory table, size and addresses")
        desc_len, avail_len, used_len = ring_sizes(vring.size)
        places = []
        for what, address, length in (("descriptor table", vring.address.desc_user_addr, desc_len),
                                      ("available ring", vring.address.avail_user_addr, avail_len),
                                      ("used ring", vring.address.used_user_addr, used_len)):
            gpa = self.memory.user_to_guest(address, length)
            if gpa is None:
                raise ProtocolFailure(f"ring {vring.index}: {what} at {address:#x}+{length:#x} is outside "
                                      "the memory table")
            places.append(gpa)
        queue = Virtqueue(MAX_QUEUE_SIZE, self.memory.memory, vring.index)
        queue.size = vring.size
        queue.desc_table, queue.avail_ring, queue.used_ring = places
        queue.set_features(self.acked_features)
        queue.last_avail_idx, queue.next_used = last_avail, next_used
        queue.ready = True
        try:
            queue.validate()
        except VirtqueueError as exc:
            raise ProtocolFailure(str(exc)) from None
        self._recover(vring, queue)
        vring.queue, vring.kick = queue, kick
        self.selector.register(kick, selectors.EVENT_READ, ("kick", vring.index))
        if vring.enabled:
            self._on_kick(vring.index, drain_only=True)

    def _stop_ring(self, vring: Vring) -> int:
        """Stop ``vring`` after its requests in flight; the next available index."""
        queue = vring.queue
        if queue is None:
            return vring.base
        vring.wait_inflight()
        driver = self._driven(vring.index)
        if driver is not None:
            driver.ring_stopped(vring.index)  # chains it popped and did not use go back first
        if vring.kick is not None:
            try:
                self.selector.unregister(vring.kick)
            except KeyError:
                pass
        vring.queue = None
        vring.base = queue.last_avail_idx
        return queue.last_avail_idx

    def _on_kick(self, index: int, *, drain_only: bool = False) -> None:
        vring = self.vrings[index]
        if not drain_only and vring.kick is not None:
            try:
                os.eventfd_read(vring.kick)
            except (BlockingIOError, InterruptedError):
                pass
        queue = vring.queue
        if queue is None or not vring.enabled:
            return
        driver = self._driven(index)
        if driver is not None:
            try:
                driver.ring_kicked(DrivenRing(self, vring, queue))
            except Exception:  # a bug: this ring stops, the daemon goes on
                log.exception("%s: ring %d failed", self.device.name, index)
                self._ring_broken(vring, VirtqueueError(ErrorKind.DEVICE, f"ring {index}: internal error"))
            return
        while True:
            try:
                if vring.resubmit:
                    chain: DescriptorChain | None = queue.chain_at(vring.resubmit.pop(0))
                else:
                    chain = queue.pop()
                    if chain is not None and vring.record is not None:
                        vring.record.taken(chain.head)
            except VirtqueueError as exc:
                self._ring_broken(vring, exc)
                return
            if chain is None:
                return
            if self.pool is None:
                self._serve(vring, queue, chain)
            else:
                vring.track(self.pool.submit(self._serve, vring, queue, chain))

    def _serve(self, vring: Vring, queue: Virtqueue, chain: DescriptorChain) -> None:
        try:
            written = self.device.handle(vring.index, chain)
        except VirtqueueError as exc:
            self._ring_broken(vring, exc)
            return
        except Exception:  # a bug: the request fails, the daemon goes on
            log.exception("%s: ring %d: request failed", self.device.name, vring.index)
            written = 0
        with vring.lock:
            try:
                record = vring.record
                if record is not None:
                    record.completing(chain.head)
                queue.add_used(chain.head, written)
                if record is not None:
                    record.completed(chain.head, queue.next_used)
                notify = queue.needs_notification()
            except VirtqueueError as exc:
                self._ring_broken(vring, exc)
                return
            if notify and vring.call is not None:
                os.eventfd_write(vring.call, 1)

    def _ring_broken(self, vring: Vring, exc: VirtqueueError) -> None:
        log.warning("%s: ring %d stopped: the guest broke the virtqueue protocol: %s", self.device.name,
                    vring.index, exc)
        with vring.lock:
            if vring.queue is not None:
                vring.queue.mark_broken(str(exc))
            if vring.err is not None:
                os.eventfd_write(vring.err, 1)


#: Requests a frontend may send before SET_OWNER (QEMU asks for features first).
_BEFORE_OWNER: Final = frozenset({Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.SET_PROTOCOL_FEATURES,
                                  Req.GET_QUEUE_NUM, Req.GET_CONFIG})


def _name(request: int) -> str:
    try:
        return Req(request).name
    except ValueError:
        return str(request)
