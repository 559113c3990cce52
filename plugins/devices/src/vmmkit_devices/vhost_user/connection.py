"""One vhost-user connection, frontend side: requests with their replies (and ``REPLY_ACK``
acknowledgements), in the order QEMU's ``hw/virtio/vhost-user.c`` sends them.

Every request is synchronous (the backend answers before the next one is sent) and guarded by
a lock: activation runs on a vCPU thread, reset on another, the hang-up watcher on the event
loop. The backend's answers are hostile input: a reply for another request, a bad size or a
non-zero acknowledgement raises :class:`VhostUserError`; a closed connection raises
:class:`VhostUserDisconnected`. Each waits at most :data:`REPLY_TIMEOUT` seconds.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from vmmkit.errors import DeviceError
from vmmkit.vhost_user import protocol as p
from vmmkit.vhost_user.protocol import FrontendRequest as Req

_T = TypeVar("_T")

#: Seconds a backend has to answer one request.
REPLY_TIMEOUT: Final = 10.0
#: Seconds to wait for a backend to connect to a server-mode socket.
ACCEPT_TIMEOUT: Final = 30.0


class VhostUserError(DeviceError):
    """The backend refused a request, answered wrongly, or cannot be reached."""


class VhostUserConnection:
    """The frontend's end of one backend connection (``sock``, connected)."""

    def __init__(self, sock: socket.socket, path: str, device_id: str) -> None:
        sock.settimeout(REPLY_TIMEOUT)
        self.sock = sock
        self.path = path
        self.device_id = device_id
        self.protocol_features = 0  # negotiated (SET_PROTOCOL_FEATURES)
        self.lock = threading.Lock()
        self.requests = 0

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, device_id: str) -> VhostUserConnection:
        """Client mode: connect to the backend listening on ``path``."""
        what = f"{device_id}: vhost-user socket {path}"
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise VhostUserError(f"{what} does not exist (start the vhost-user backend first)") from None
        except OSError as exc:
            raise VhostUserError(f"{what}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise VhostUserError(f"{what} is not a Unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(REPLY_TIMEOUT)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            hint = " (no backend listens there)" if exc.errno == errno.ECONNREFUSED else ""
            raise VhostUserError(f"{what}: cannot connect: {exc.strerror}{hint}") from None
        return cls(sock, path, device_id)

    @classmethod
    def listen_and_accept(cls, path: str, device_id: str, timeout: float = ACCEPT_TIMEOUT) -> VhostUserConnection:
        """Server mode (``vhost_mode=server``): listen on ``path`` (created; an existing socket
        file is replaced) and wait for the backend to connect."""
        what = f"{device_id}: vhost-user socket {path}"
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise VhostUserError(f"{what}: {exc.strerror}") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            listener.listen(1)
            listener.settimeout(timeout)
            sock, _ = listener.accept()
        except TimeoutError:
            raise VhostUserError(f"{what}: no backend connected within {timeout:.0f} s") from None
        except OSError as exc:
            raise VhostUserError(f"{what}: cannot listen: {exc.strerror}") from None
        finally:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        return cls(sock, path, device_id)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- requests ----------------------------------------------------------------------------

    def has(self, feature: p.ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    def call(self, request: Req, payload: bytes = b"", fds: Sequence[int] = (), *, reply: bool = False) -> bytes:
        """Send ``request``; with ``reply``, return the reply's payload. Without, and with
        ``REPLY_ACK`` negotiated, wait for the backend's acknowledgement (a non-zero one is a
        refusal). A reply carrying descriptors is refused."""
        answer, received = self._exchange(request, payload, fds, reply=reply)
        if received:
            for fd in received:
                os.close(fd)
            raise VhostUserError(f"{self.device_id}: vhost-user backend sent descriptors with its "
                                 f"{request.name} reply")
        return answer

    def call_for_fds(self, request: Req, payload: bytes, count: int) -> tuple[bytes, list[int]]:
        """Send ``request`` and return its reply with exactly ``count`` descriptors (the caller's
        to close)."""
        answer, received = self._exchange(request, payload, (), reply=True)
        if len(received) != count:
            for fd in received:
                os.close(fd)
            raise VhostUserError(f"{self.device_id}: vhost-user backend answered {request.name} with "
                                 f"{len(received)} descriptors, expected {count}")
        return answer, received

    def _exchange(self, request: Req, payload: bytes, fds: Sequence[int], *, reply: bool) -> tuple[bytes, list[int]]:
        ack = not reply and self.has(p.ProtocolFeature.REPLY_ACK)
        flags = p.VERSION | (p.FLAG_NEED_REPLY if ack else 0)
        name = request.name
        with self.lock:
            self.requests += 1
            try:
                p.send(self.sock, p.Message(request, payload, flags), fds)
                if not (reply or ack):
                    return b"", []
                msg, received = p.recv(self.sock, Req)
            except p.VhostUserDisconnected as exc:
                raise VhostUserDisconnected(f"{self.device_id}: vhost-user backend at {self.path} hung up "
                                            f"({name}): {exc}") from None
            except p.VhostUserProtocolError as exc:
                raise VhostUserError(f"{self.device_id}: vhost-user backend at {self.path}: {exc} "
                                     f"(answering {name})") from None
            except TimeoutError:
                raise VhostUserError(f"{self.device_id}: vhost-user backend at {self.path} did not answer "
                                     f"{name} within {REPLY_TIMEOUT:.0f} s") from None
            except OSError as exc:
                raise VhostUserDisconnected(f"{self.device_id}: vhost-user backend at {self.path}: "
                                            f"{exc.strerror} ({name})") from None
        try:
            if msg.request != request or not msg.is_reply:
                raise VhostUserError(f"{self.device_id}: vhost-user backend answered {name} with request "
                                     f"{msg.request} flags {msg.flags:#x}")
            if ack:
                status = self._unpack(p.unpack_u64, msg.payload, name)
                if status:
                    raise VhostUserError(f"{self.device_id}: vhost-user backend refused {name} (status {status})")
        except BaseException:
            for fd in received:
                os.close(fd)
            raise
        return msg.payload, received

    def _unpack(self, unpack: Callable[[bytes], _T], data: bytes, name: str) -> _T:
        try:
            return unpack(data)
        except p.VhostUserProtocolError as exc:
            raise VhostUserError(f"{self.device_id}: vhost-user backend's {name} reply: {exc}") from None

    def get_u64(self, request: Req) -> int:
        return self._unpack(p.unpack_u64, self.call(request, reply=True), request.name)

    # -- the messages ------------------------------------------------------------------------

    def set_owner(self) -> None:
        self.call(Req.SET_OWNER)

    def get_features(self) -> int:
        return self.get_u64(Req.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(Req.SET_FEATURES, p.pack_u64(features))

    def negotiate_protocol_features(self, wanted: int) -> int:
        """GET_PROTOCOL_FEATURES, then SET_PROTOCOL_FEATURES with the ones in ``wanted``; from
        then on REPLY_ACK (if negotiated) applies. Returns the negotiated set."""
        offered = self.get_u64(Req.GET_PROTOCOL_FEATURES)
        chosen = offered & wanted
        self.call(Req.SET_PROTOCOL_FEATURES, p.pack_u64(chosen))
        self.protocol_features = chosen
        return chosen

    def get_queue_num(self) -> int:
        return self.get_u64(Req.GET_QUEUE_NUM)

    def set_mem_table(self, regions: Sequence[p.MemoryRegion], fds: Sequence[int]) -> None:
        self.call(Req.SET_MEM_TABLE, p.pack_memory_table(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self.call(Req.SET_VRING_NUM, p.VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(Req.SET_VRING_BASE, p.VringState(index, base).pack())

    def set_vring_addr(self, address: p.VringAddress) -> None:
        self.call(Req.SET_VRING_ADDR, address.pack())

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.call(Req.SET_VRING_KICK, p.pack_vring_file(index), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self.call(Req.SET_VRING_CALL, p.pack_vring_file(index), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(Req.SET_VRING_ENABLE, p.VringState(index, int(enable)).pack())

    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index``; its next available index (where to resume)."""
        state = self._unpack(p.VringState.unpack, self.call(Req.GET_VRING_BASE, p.VringState(index, 0).pack(),
                                                                reply=True), "GET_VRING_BASE")
        if state.index != index:
            raise VhostUserError(f"{self.device_id}: GET_VRING_BASE for queue {index} answered for {state.index}")
        return state.num

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[p.Inflight, int]:
        """GET_INFLIGHT_FD: the backend's buffer for tracking in-flight requests (its descriptor
        is the caller's to close)."""
        answer, (fd,) = self.call_for_fds(Req.GET_INFLIGHT_FD, p.Inflight(0, 0, num_queues, queue_size).pack(), 1)
        try:
            inflight = self._unpack(p.Inflight.unpack, answer, "GET_INFLIGHT_FD")
            if inflight.mmap_size == 0:
                raise VhostUserError(f"{self.device_id}: GET_INFLIGHT_FD answered an empty buffer")
        except BaseException:
            os.close(fd)
            raise
        return p.Inflight(inflight.mmap_size, inflight.mmap_offset, num_queues, queue_size), fd

    def set_inflight_fd(self, inflight: p.Inflight, fd: int) -> None:
        self.call(Req.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def get_config(self, size: int) -> bytes:
        """The first ``size`` bytes of the device's configuration space (GET_CONFIG)."""
        request = p.ConfigSpace(0, size, 0, bytes(size)).pack()
        answer = self._unpack(p.ConfigSpace.unpack, self.call(Req.GET_CONFIG, request, reply=True), "GET_CONFIG")
        if (answer.offset, answer.size) != (0, size):
            raise VhostUserError(f"{self.device_id}: GET_CONFIG of {size} bytes answered with "
                                 f"{answer.size} bytes at {answer.offset}")
        return answer.payload

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the driver wrote ``data`` at ``offset`` of the configuration space
        (``VHOST_SET_CONFIG_TYPE_FRONTEND``, as QEMU's ``vhost_user_set_config`` sends it)."""
        self.call(Req.SET_CONFIG, p.ConfigSpace(offset, len(data), 0, bytes(data)).pack())

    def peer_closed(self) -> bool:
        """Whether the backend hung up (or sent something unasked); only when no request is in
        flight (``False`` otherwise)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
            if not poller.poll(0):
                return False
            return True  # end of file, or an unsolicited message: either way the connection is over
        finally:
            self.lock.release()


class VhostUserDisconnected(VhostUserError):
    """The backend closed the connection."""


def wait_for_socket(path: str, timeout: float) -> bool:
    """Whether a socket file appears at ``path`` within ``timeout`` seconds (tests, restarts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False
