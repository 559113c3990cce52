"""One vsock stream between a guest AF_VSOCK socket and a host AF_UNIX stream: its state and its
credit accounting (virtio 1.2, sections 5.10.6.3 and 5.10.6.6; Cloud Hypervisor's
``virtio-devices/src/vsock/csm/connection.rs`` is the model).

Ports: ``local_port`` is the host's side of the stream, ``peer_port`` the guest's.

Flow control, both ways:

- guest -> host: the device advertises :data:`BUF_ALLOC` bytes and ``fwd_cnt``, the bytes it has
  written to the host stream. What the host stream does not take at once waits in ``tx_buf``; a
  guest that sends more than the credit it was given overruns it and the stream is reset. A
  ``CREDIT_UPDATE`` goes to the guest once :data:`CREDIT_UPDATE_THRESHOLD` bytes were forwarded
  since the guest last heard ``fwd_cnt`` (every packet to the guest carries it), or when asked.
- host -> guest: the device sends at most ``peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`` bytes
  (all counters wrap at 2**32); with no credit it stops reading the host stream, asks once with
  ``CREDIT_REQUEST`` and waits for the guest's next header.

Closing: the guest's ``SHUTDOWN`` with both flags is answered with ``RST`` once what it sent has
reached the host (or after :data:`SHUTDOWN_TIMEOUT`); ``SEND`` alone shuts the host stream's
writing side after the flush. The host shutting its writing side (EOF on read) becomes
``SHUTDOWN(SEND)``; the host closing the stream (EOF with hang-up) ``SHUTDOWN(RCV|SEND)``, after
which the guest's ``RST`` ends the connection (or the device resets it after the timeout).
Anything out of protocol (data before the handshake, a second ``RESPONSE``, a credit overrun, a
host stream error) resets the connection: the guest gets ``RST`` and the host stream is closed.
"""

from __future__ import annotations

import enum
import select
import socket
import time
from typing import Final

from vmmkit_devices.virtio.vsock.packet import (
    HOST_CID,
    MAX_PAYLOAD,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    U32,
    Header,
    Op,
)

#: The receive buffer the device advertises per stream (Cloud Hypervisor's CONN_TX_BUF_SIZE).
BUF_ALLOC: Final = 256 * 1024
#: Forwarded bytes after which the guest is sent a credit update unasked.
CREDIT_UPDATE_THRESHOLD: Final = BUF_ALLOC // 4
#: Seconds the guest has to answer a host-initiated REQUEST. Cloud Hypervisor allows 2 s; a guest
#: whose kernel runs emulated (nested kvm_pvm) needs more under load.
CONNECT_TIMEOUT: Final = 5.0
#: Seconds a closing stream waits for the guest's RST or for its data to reach the host (Cloud
#: Hypervisor's CONN_SHUTDOWN_TIMEOUT_MS).
SHUTDOWN_TIMEOUT: Final = 2.0


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST owed or sent, no RESPONSE yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # the host stream is gone: SHUTDOWN(RCV|SEND) owed or sent


#: The control packets a connection may owe the guest, in the order they are sent.
_CONTROL_ORDER: Final = (Op.RESPONSE, Op.REQUEST, Op.SHUTDOWN, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST)


def wrapping(value: int) -> int:
    return value & U32


def _hung_up(stream: socket.socket) -> bool:
    poller = select.poll()
    poller.register(stream.fileno(), 0)
    return any(mask & select.POLLHUP for _, mask in poller.poll(0))


class Connection:
    """One stream. Not thread-safe: the muxer drives it from its loop thread.

    :param guest_cid: the guest's CID.
    :param local_port: the host side's port.
    :param peer_port: the guest side's port.
    :param stream: the connected, non-blocking host stream (the connection closes it).
    :param host_initiated: ``True``: a host ``CONNECT``; a REQUEST is owed to the guest and
        ``OK <local_port>\\n`` goes to the host once the guest answers.
    """

    def __init__(self, guest_cid: int, local_port: int, peer_port: int, stream: socket.socket, *,
                 host_initiated: bool) -> None:
        self.guest_cid = guest_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.stream = stream
        self.host_initiated = host_initiated
        self.state = State.CONNECTING if host_initiated else State.ESTABLISHED
        self.owed: set[Op] = {Op.REQUEST} if host_initiated else {Op.RESPONSE}
        self.shutdown_flags = 0  # of the SHUTDOWN owed
        self.rst_owed = False
        self.dead = False  #: to be removed once nothing is owed
        self.host_readable = not host_initiated  #: the host stream may have data for the guest
        self.tx_buf = bytearray()  #: guest data the host stream has not taken yet
        self.prefix = b""  #: the ``OK`` line, written to the host before any data
        self.fwd_cnt = 0
        self.last_fwd_cnt_to_peer = 0
        self.rx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.peer_shutdown = 0  #: SHUTDOWN flags received from the guest
        self.host_eof = False  #: the host shut its writing side (we owe or sent SHUTDOWN SEND)
        self.host_hup = False  #: the host closed the stream
        self.host_write_shut = False
        self.credit_requested = False
        self.finishing = False  #: an RST ends the stream once tx_buf is flushed
        self.expiry: float | None = None
        self.reason = ""  #: why the connection was reset

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # -- credit ------------------------------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes the guest can take now (0 when its counters claim the impossible)."""
        in_flight = wrapping(self.rx_cnt - self.peer_fwd_cnt)
        return max(0, self.peer_buf_alloc - in_flight)

    def absorb_credit(self, header: Header) -> None:
        """Take the guest's buf_alloc and fwd_cnt from any of its headers."""
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt
        if self.credit_requested and self.peer_credit() > 0:
            self.credit_requested = False

    def _unreported(self) -> int:
        return wrapping(self.fwd_cnt - self.last_fwd_cnt_to_peer)

    # -- from the guest ----------------------------------------------------------------------

    def from_guest(self, header: Header, payload: bytes) -> None:
        """Absorb a checked packet of this connection (see :func:`.packet.check_guest_header`)."""
        op = header.op
        if op == Op.RST:
            self.dead = True
            self.owed.clear()
            self.rst_owed = False
            return
        self.absorb_credit(header)
        if op == Op.RESPONSE:
            if self.state is not State.CONNECTING or Op.REQUEST in self.owed:
                self.reset("RESPONSE outside a handshake")
                return
            self.state = State.ESTABLISHED
            self.expiry = None
            self.prefix = b"OK %d\n" % self.local_port
            self.host_readable = True
            self.flush()
        elif op == Op.REQUEST:
            self.reset("REQUEST for a connected port pair")
        elif op == Op.RW:
            self._receive_data(payload)
        elif op == Op.SHUTDOWN:
            self._peer_shutdown(header.flags)
        elif op == Op.CREDIT_REQUEST:
            self.owed.add(Op.CREDIT_UPDATE)
        # CREDIT_UPDATE: absorbed above

    def _receive_data(self, payload: bytes) -> None:
        if self.state is not State.ESTABLISHED or Op.RESPONSE in self.owed:
            self.reset("data before the connection was established")
            return
        if self.peer_shutdown & SHUTDOWN_SEND:
            self.reset("data after SHUTDOWN(SEND)")
            return
        if len(self.tx_buf) + len(payload) > BUF_ALLOC:
            self.reset(f"credit overrun: {len(self.tx_buf) + len(payload)} bytes buffered, {BUF_ALLOC} allowed")
            return
        self.tx_buf += payload
        self.flush()

    def _peer_shutdown(self, flags: int) -> None:
        self.peer_shutdown |= flags & SHUTDOWN_BOTH
        if self.state is State.CLOSING or (self.host_eof and self.peer_shutdown & SHUTDOWN_SEND):
            self._finish()  # nothing can flow either way any more
        elif self.peer_shutdown == SHUTDOWN_BOTH:
            self._finish()
        elif self.peer_shutdown & SHUTDOWN_SEND:
            self.flush()

    def _finish(self) -> None:
        """End the stream with an RST once the guest's data reached the host."""
        self.finishing = True
        self.flush()
        if not self.tx_buf or self.host_hup:
            self.reset("closed", quiet=True)
        elif self.expiry is None:
            self.expiry = time.monotonic() + SHUTDOWN_TIMEOUT

    # -- to the host -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the ``OK`` line and buffered guest data to the host stream, as far as it takes
        them; shut its writing side when the guest will send no more."""
        if self.dead or self.host_hup:
            return
        try:
            while self.prefix:
                sent = self.stream.send(self.prefix)
                self.prefix = self.prefix[sent:]
            while self.tx_buf:
                sent = self.stream.send(self.tx_buf)
                del self.tx_buf[:sent]
                self.fwd_cnt = wrapping(self.fwd_cnt + sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # EPIPE, ECONNRESET: the host peer is gone
            self.host_hup = True
            self.reset(f"host stream: {exc.strerror}")
            return
        if self._unreported() >= CREDIT_UPDATE_THRESHOLD and self.state is State.ESTABLISHED:
            self.owed.add(Op.CREDIT_UPDATE)
        if not self.tx_buf and not self.prefix:
            if self.peer_shutdown & SHUTDOWN_SEND and not self.host_write_shut:
                self.host_write_shut = True
                try:
                    self.stream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if self.finishing:
                self.reset("closed", quiet=True)

    def wants_write(self) -> bool:
        return not self.dead and not self.host_hup and bool(self.prefix or self.tx_buf)

    def wants_read(self) -> bool:
        """Whether to watch the host stream for data (there is credit and nothing pending)."""
        return (self.state is State.ESTABLISHED and not self.dead and not self.host_readable
                and not self.host_eof and not self.host_hup and not self.peer_shutdown & SHUTDOWN_RCV
                and self.peer_credit() > 0)

    def host_event(self, *, readable: bool, hangup: bool, error: bool, writable: bool) -> None:
        """The host stream's epoll events."""
        if error:
            self.host_hup = True
            self.reset("host stream error")
            return
        if hangup:
            self.host_hup = True
            if self.state is State.CONNECTING:
                self.reset("the host closed the stream before the guest answered")
                return
            self.host_readable = True  # drain what it wrote, then see EOF
        if readable:
            self.host_readable = True
        if writable:
            self.flush()

    def host_closed(self) -> None:
        """The host stream reads EOF: a half close (its writing side), or a full close (a
        hang-up, which the read may see before the event loop does)."""
        self.host_readable = False
        if not self.host_hup and _hung_up(self.stream):
            self.host_hup = True
        if self.host_hup:
            if self.state is State.ESTABLISHED:
                self.state = State.CLOSING
                self.shutdown_flags = SHUTDOWN_BOTH
                self.owed.add(Op.SHUTDOWN)
                self.expiry = time.monotonic() + SHUTDOWN_TIMEOUT
                if self.peer_shutdown & SHUTDOWN_SEND:
                    self.reset("closed", quiet=True)
        elif not self.host_eof:
            self.host_eof = True
            if self.peer_shutdown & SHUTDOWN_SEND:
                self._finish()
            else:
                self.shutdown_flags = SHUTDOWN_SEND
                self.owed.add(Op.SHUTDOWN)

    # -- to the guest ------------------------------------------------------------------------

    def reset(self, reason: str, *, quiet: bool = False) -> None:
        """End the stream: the guest gets an RST, then the connection goes."""
        if not self.dead:
            self.reason = "" if quiet else reason
        self.dead = True
        self.owed.clear()
        self.rst_owed = True

    def has_rx(self) -> bool:
        """Whether a packet is owed to the guest (control, or data the host may have)."""
        return self.rst_owed or bool(self.owed) or self._data_allowed()

    def _data_allowed(self) -> bool:
        return (self.host_readable and not self.dead and self.state is not State.CONNECTING
                and not self.peer_shutdown & SHUTDOWN_RCV and not self.host_eof
                and Op.RESPONSE not in self.owed)

    def header(self, op: Op, length: int = 0, flags: int = 0) -> Header:
        """A packet to the guest; it carries (and so reports) ``fwd_cnt``."""
        self.last_fwd_cnt_to_peer = self.fwd_cnt
        return Header(HOST_CID, self.guest_cid, self.local_port, self.peer_port, length, TYPE_STREAM, op, flags,
                      BUF_ALLOC, self.fwd_cnt)

    def next_packet(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for the guest, with at most ``room`` payload bytes; ``None`` when
        there is nothing to send (now, or with this little room)."""
        if self.rst_owed:
            self.rst_owed = False
            return self.header(Op.RST), b""
        for op in _CONTROL_ORDER:
            if op in self.owed:
                self.owed.discard(op)
                if op == Op.REQUEST:
                    self.expiry = time.monotonic() + CONNECT_TIMEOUT
                if op == Op.CREDIT_REQUEST:
                    self.credit_requested = True
                return self.header(op, flags=self.shutdown_flags if op == Op.SHUTDOWN else 0), b""
        if not self._data_allowed():
            self.host_readable = False
            return None
        credit = self.peer_credit()
        if credit == 0:
            self.host_readable = False
            if not self.credit_requested:
                self.credit_requested = True
                return self.header(Op.CREDIT_REQUEST), b""
            return None
        want = min(room, credit, MAX_PAYLOAD)
        if want <= 0:
            return None
        try:
            data = self.stream.recv(want)
        except (BlockingIOError, InterruptedError):
            self.host_readable = False
            return None
        except OSError as exc:
            self.host_hup = True
            self.reset(f"host stream: {exc.strerror}")
            self.rst_owed = False
            return self.header(Op.RST), b""
        if not data:
            self.host_closed()
            return self.next_packet(room) if self.has_rx() else None
        self.rx_cnt = wrapping(self.rx_cnt + len(data))
        return self.header(Op.RW, len(data)), data

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
