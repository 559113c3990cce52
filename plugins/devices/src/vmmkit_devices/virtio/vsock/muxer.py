"""The hybrid vsock muxer: guest vsock streams to host Unix-socket streams, Cloud Hypervisor's
``virtio-devices/src/vsock/unix/muxer.rs`` design (its ``docs/vsock.md`` for users).

- Host-initiated: a host program connects to the device's socket (``--vsock socket=PATH``) and
  writes ``CONNECT <port>\\n``; the device sends the guest a REQUEST from host port
  ``local_port`` (allocated from 2**30 up) to guest port ``port``. When the guest answers, the
  host reads ``OK <local_port>\\n`` and then the stream; when the guest refuses (RST, nobody
  listens) or does not answer in time, the host stream is closed.
- Guest-initiated: a guest connecting to the host (CID 2) port ``P`` is connected to the Unix
  socket ``PATH_P``; when nothing listens there, the guest gets an RST (``ECONNRESET``).

Each stream is a :class:`~.connection.Connection`; the muxer owns the listening socket, host
streams still waiting for their ``CONNECT`` line, the connections (at most
:data:`MAX_CONNECTIONS`) and the order in which they get RX buffers (round robin), plus a bounded
backlog of RSTs for packets that belong to no connection. It runs on the device's loop thread
(:class:`~.loop.MuxerLoop`) and never raises for anything the guest or a host peer does.
"""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger
from vmmkit_devices.virtio.vsock.connection import Connection
from vmmkit_devices.virtio.vsock.loop import MuxerLoop
from vmmkit_devices.virtio.vsock.packet import U32, Header, Op, check_guest_header

log = get_logger()

#: Streams at once, host- and guest-initiated together (Cloud Hypervisor's MAX_CONNECTIONS).
MAX_CONNECTIONS: Final = 1023
#: RSTs for packets of no connection waiting for RX buffers; more are dropped.
MAX_BACKLOG: Final = 1024
#: The longest ``CONNECT <port>\n`` line (``CONNECT 4294967295\n`` is 19 bytes).
MAX_CONNECT_LINE: Final = 32
#: The first host port of host-initiated streams (Cloud Hypervisor starts there too).
FIRST_LOCAL_PORT: Final = 1 << 30
_CONNECT: Final = re.compile(rb"CONNECT ([0-9]{1,10})\n")


def parse_connect(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>\\n`` line, ``None`` if it is anything else."""
    match = _CONNECT.fullmatch(line)
    if match is None:
        return None
    port = int(match.group(1))
    return port if port < U32 else None


def bind_listener(path: str, device_id: str) -> socket.socket:
    """The device's listening socket at ``path``; an existing file there is refused by name (as
    Cloud Hypervisor's bind fails), a stale socket of a previous run included."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DeviceError(f"{device_id}: vsock socket {path}: {exc.strerror}") from None
    else:
        what = "a socket" if stat.S_ISSOCK(st.st_mode) else "a file"
        raise DeviceError(f"{device_id}: vsock socket {path} exists ({what}); remove it first")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise DeviceError(f"{device_id}: cannot listen on vsock socket {path}: {exc.strerror or exc}") from None
    return listener


class Handshake:
    """A host stream waiting for its ``CONNECT`` line."""

    def __init__(self, stream: socket.socket) -> None:
        self.stream = stream
        self.line = b""


class Muxer:
    """The streams of one vsock device.

    :param guest_cid: the guest's CID.
    :param socket_path: the host Unix socket (guest-initiated streams go to ``<path>_<port>``).
    :param listener: the bound, listening, non-blocking socket at ``socket_path``.
    :param loop: the device's loop (host streams are watched there).
    :param kick_rx: called on the loop thread when packets wait for the guest.
    :param count: the device's counter.
    :param lock: held while the muxer's own loop callbacks run (the device's lifecycle calls
        take it from other threads).
    """

    def __init__(self, guest_cid: int, socket_path: str, listener: socket.socket, loop: MuxerLoop,
                 kick_rx: Callable[[], None], count: Callable[[str, int], None],
                 lock: threading.RLock | None = None) -> None:
        self.lock = lock if lock is not None else threading.RLock()
        self.guest_cid = guest_cid
        self.socket_path = socket_path
        self.listener = listener
        self.loop = loop
        self.kick_rx = kick_rx
        self.count = count
        self.connections: dict[tuple[int, int], Connection] = {}
        self.handshakes: dict[int, Handshake] = {}
        self.backlog: deque[Header] = deque()
        self._rx_order: dict[tuple[int, int], None] = {}  # an ordered set
        self._next_port = FIRST_LOCAL_PORT
        self.running = False

    # -- lifecycle (callers hold the device's muxer lock) -------------------------------------

    def start(self) -> None:
        """Serve: watch the listener and every stream."""
        self.running = True
        self.loop.watch(self.listener.fileno(), select.EPOLLIN, lambda _mask: self._accept())
        for fd, handshake in self.handshakes.items():
            self._watch_handshake(fd, handshake)
        for conn in self.connections.values():
            self._sync(conn)
        self.loop.set_tick(self._tick, 0.5)

    def stop(self) -> None:
        """Stop serving (pause): nothing is watched; streams stay."""
        self.running = False
        self.loop.set_tick(None)
        self.loop.unwatch(self.listener.fileno())
        for fd in self.handshakes:
            self.loop.unwatch(fd)
        for conn in self.connections.values():
            self.loop.unwatch(conn.stream.fileno())

    def reset(self) -> None:
        """The driver reset the device: every stream ends (host streams are closed)."""
        self.stop()
        for handshake in self.handshakes.values():
            handshake.stream.close()
        for conn in self.connections.values():
            conn.close()
        self.handshakes.clear()
        self.connections.clear()
        self._rx_order.clear()
        self.backlog.clear()

    def close(self) -> None:
        """Reset and stop listening (the socket file is removed)."""
        self.reset()
        try:
            self.listener.close()
        finally:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except OSError:
                pass

    # -- the guest's packets -----------------------------------------------------------------

    def from_guest(self, header: Header, payload_available: int, read_payload: Callable[[int], bytes]) -> None:
        """One packet from the TX queue. ``read_payload(n)`` reads its first ``n`` payload bytes."""
        problem = check_guest_header(header, payload_available, self.guest_cid)
        key = (header.dst_port, header.src_port)
        if problem is not None:
            reason, answer = problem
            self.count("tx_refused", 1)
            log.debug("vsock.packet_refused", cid=self.guest_cid, reason=reason)
            if answer:
                conn = self.connections.get(key)
                if conn is not None:
                    conn.reset(reason)
                    self._changed(conn)
                else:
                    self._refuse(header)
            return
        conn = self.connections.get(key)
        if conn is None:
            if header.op == Op.REQUEST:
                self._guest_connect(header)
            elif header.op != Op.RST:
                self._refuse(header)
            return
        payload = read_payload(header.len) if header.op == Op.RW and header.len else b""
        if payload:
            self.count("tx_bytes", len(payload))
        conn.from_guest(header, payload)
        self._changed(conn)

    def _refuse(self, header: Header) -> None:
        if header.op == Op.RST:
            return
        if len(self.backlog) >= MAX_BACKLOG:
            self.count("rx_dropped", 1)
            return
        self.backlog.append(header.reply(Op.RST))

    def _guest_connect(self, header: Header) -> None:
        if len(self.connections) + len(self.handshakes) >= MAX_CONNECTIONS:
            self.count("connections_refused", 1)
            self._refuse(header)
            return
        path = f"{self.socket_path}_{header.dst_port}"
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            stream.connect(path)
        except OSError as exc:  # nobody listens (ENOENT, ECONNREFUSED), backlog full (EAGAIN)...
            stream.close()
            self.count("connections_refused", 1)
            log.debug("vsock.guest_connect_refused", path=path, error=exc.strerror or str(exc))
            self._refuse(header)
            return
        conn = Connection(self.guest_cid, header.dst_port, header.src_port, stream, host_initiated=False)
        conn.absorb_credit(header)
        self.connections[conn.key] = conn
        self.count("connections", 1)
        log.debug("vsock.guest_connected", port=header.dst_port, peer_port=header.src_port)
        self._changed(conn)

    # -- packets for the guest ---------------------------------------------------------------

    def has_rx(self) -> bool:
        return bool(self.backlog or self._rx_order)

    def next_rx(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for an RX buffer with ``room`` payload bytes; ``None``: none now."""
        if self.backlog:
            return self.backlog.popleft(), b""
        for key in list(self._rx_order):
            conn = self.connections.get(key)
            self._rx_order.pop(key, None)
            if conn is None:
                continue
            packet = conn.next_packet(room)
            self._changed(conn)  # re-queued at the end when it still owes something
            if packet is not None:
                if packet[1]:
                    self.count("rx_bytes", len(packet[1]))
                return packet
        return None

    # -- the host's streams ------------------------------------------------------------------

    def _accept(self) -> None:
        with self.lock:
            self._accept_locked()

    def _accept_locked(self) -> None:
        for _ in range(64):
            try:
                stream, _address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE...
                log.warning("vsock.accept_failed", path=self.socket_path, error=exc.strerror)
                return
            if len(self.connections) + len(self.handshakes) >= MAX_CONNECTIONS:
                self.count("connections_refused", 1)
                stream.close()
                continue
            stream.setblocking(False)
            handshake = Handshake(stream)
            self.handshakes[stream.fileno()] = handshake
            self._watch_handshake(stream.fileno(), handshake)

    def _watch_handshake(self, fd: int, handshake: Handshake) -> None:
        self.loop.watch(fd, select.EPOLLIN, lambda _mask: self._read_connect(fd, handshake))

    def _read_connect(self, fd: int, handshake: Handshake) -> None:
        with self.lock:
            self._read_connect_locked(fd, handshake)

    def _read_connect_locked(self, fd: int, handshake: Handshake) -> None:
        """Read the ``CONNECT`` line without taking any byte after it."""
        if self.handshakes.get(fd) is not handshake:
            return
        try:
            data = handshake.stream.recv(MAX_CONNECT_LINE, socket.MSG_PEEK)
            end = data.find(b"\n")
            take = len(data) if end < 0 else end + 1
            if data:
                handshake.line += handshake.stream.recv(take)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        port = parse_connect(handshake.line) if handshake.line.endswith(b"\n") else None
        if port is None and data and len(handshake.line) < MAX_CONNECT_LINE and b"\n" not in handshake.line:
            return  # more of the line to come
        self.loop.unwatch(fd)
        del self.handshakes[fd]
        if port is None:
            self.count("connections_refused", 1)
            log.debug("vsock.bad_connect_line", line=handshake.line[:MAX_CONNECT_LINE].decode("ascii", "replace"))
            handshake.stream.close()
            return
        conn = Connection(self.guest_cid, self._allocate_port(port), port, handshake.stream, host_initiated=True)
        self.connections[conn.key] = conn
        self.count("connections", 1)
        self._changed(conn)
        self.kick_rx()

    def _allocate_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT if port >= U32 - 1 else port + 1
            if (port, peer_port) not in self.connections:
                return port

    def _host_event(self, key: tuple[int, int], conn: Connection, mask: int) -> None:
        with self.lock:
            self._host_event_locked(key, conn, mask)

    def _host_event_locked(self, key: tuple[int, int], conn: Connection, mask: int) -> None:
        if self.connections.get(key) is not conn or not self.running:
            return
        conn.host_event(readable=bool(mask & select.EPOLLIN), hangup=bool(mask & select.EPOLLHUP),
                        error=bool(mask & select.EPOLLERR), writable=bool(mask & select.EPOLLOUT))
        self._changed(conn)
        if self.has_rx():
            self.kick_rx()

    def _tick(self) -> None:
        with self.lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        now = time.monotonic()
        expired = [conn for conn in self.connections.values()
                   if conn.expiry is not None and now >= conn.expiry and not conn.dead]
        for conn in expired:
            conn.reset("timed out")
            self._changed(conn)
        if expired:
            self.kick_rx()

    # -- bookkeeping -------------------------------------------------------------------------

    def _changed(self, conn: Connection) -> None:
        """After anything happened to ``conn``: queue it for RX, watch its stream as it needs, or
        remove it when it is done."""
        key = conn.key
        if conn.dead and conn.reason:
            log.debug("vsock.connection_reset", port=conn.local_port, peer_port=conn.peer_port, reason=conn.reason)
            self.count("connections_reset", 1)
            conn.reason = ""
        if conn.has_rx():
            self._rx_order[key] = None
        else:
            self._rx_order.pop(key, None)
        if conn.dead and not conn.has_rx():
            self.loop.unwatch(conn.stream.fileno())
            self.connections.pop(key, None)
            conn.close()
            return
        self._sync(conn)

    def _sync(self, conn: Connection) -> None:
        fd = conn.stream.fileno()
        if not self.running or conn.dead or conn.host_hup or fd < 0:
            self.loop.unwatch(fd)
            return
        events = (select.EPOLLIN if conn.wants_read() else 0) | (select.EPOLLOUT if conn.wants_write() else 0)
        key = conn.key
        self.loop.watch(fd, events, lambda mask: self._host_event(key, conn, mask))
