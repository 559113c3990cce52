"""The migration wire protocol: framed requests, each answered OK or Error.

Shaped after Cloud Hypervisor's (``vm-migration/src/protocol.rs``: a fixed header of command
and payload length, ``Start``, ``Config``, ``State``, ``Memory``, ``MemoryFd``, ``Complete``,
``Abandon``; each answered by a ``Response`` of status and length), our own encoding:

request header (16 bytes, little-endian)
    ``b"VMKQ"``, command ``u16``, flags ``u16`` (0), payload length ``u64``; then the payload.
response header (16 bytes)
    ``b"VMKA"``, status ``u16`` (:data:`OK` or :data:`ERROR`), 0, length ``u64``; then that
    many bytes: an error's message (UTF-8), or nothing.

Payloads: ``START`` a JSON object ``{"protocol": "vmmkit-migration", "version":``
:data:`VERSION` ``, "vmmkit", "local"}`` (a receiver of another version answers Error);
``CONFIG`` and ``STATE`` JSON objects; ``MEMORY`` a table of ``(guest address u64, length
u64)`` pairs, followed on the stream (outside the payload length, as in Cloud Hypervisor) by
the bytes of each range in order; ``MEMORY_FD`` ``(slot u32, pad u32, guest address u64,
size u64)`` with the region's memfd passed alongside (``SCM_RIGHTS``, Unix sockets only), or
the same followed by ``file offset u64`` (32 bytes) for a region that starts inside its file
(a memory zone's second piece);
``COMPLETE`` and ``ABANDON`` nothing.

Everything read here came from another process: lengths are bounded before anything is
allocated, and a malformed frame is a :class:`ProtocolError`.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

from vmmkit.errors import VmmError

PROTOCOL: Final = "vmmkit-migration"
VERSION: Final = 1
_REQUEST: Final = struct.Struct("<4sHHQ")
_RESPONSE: Final = struct.Struct("<4sHHQ")
REQUEST_MAGIC: Final = b"VMKQ"
RESPONSE_MAGIC: Final = b"VMKA"
HEADER_SIZE: Final = _REQUEST.size
OK: Final = 0
ERROR: Final = 1
#: JSON payloads (configuration, state) larger than this are refused unread.
MAX_JSON: Final = 64 << 20
#: An error message is cut to this many bytes.
MAX_MESSAGE: Final = 64 << 10
#: Ranges in one MEMORY table.
MAX_RANGES: Final = 1 << 20
_RANGE: Final = struct.Struct("<QQ")
_MEMORY_FD: Final = struct.Struct("<IIQQ")
_MEMORY_FD_AT: Final = struct.Struct("<IIQQQ")


class Command(enum.IntEnum):
    START = 1
    CONFIG = 2
    MEMORY = 3
    STATE = 4
    COMPLETE = 5
    ABANDON = 6
    MEMORY_FD = 7


class MigrationError(VmmError):
    """A migration failed (the peer refused, went away, or sent something malformed)."""


class ProtocolError(MigrationError):
    """The peer sent something that is not this protocol."""


class PeerError(MigrationError):
    """The peer answered a request with Error (its message is this error's text)."""


def recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes. :raises ProtocolError: the peer closed the connection first."""
    buffer = bytearray(size)
    recv_into_exact(sock, memoryview(buffer), what)
    return bytes(buffer)


def recv_into_exact(sock: socket.socket, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ProtocolError(f"the peer closed the connection in the middle of {what} "
                                f"({got} of {len(view)} bytes)")
        got += n


# -- requests -------------------------------------------------------------------------------------


def pack_request(command: Command, length: int) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, int(command), 0, length)


def unpack_request(header: bytes) -> tuple[Command, int]:
    """``(command, payload length)`` of a request header.

    :raises ProtocolError: not a request of this protocol."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"a request header is {HEADER_SIZE} bytes, got {len(header)}")
    magic, command, flags, length = _REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"not a vmmkit migration request (magic {magic!r})")
    if flags:
        raise ProtocolError(f"request flags {flags:#x} are reserved (0)")
    try:
        return Command(command), length
    except ValueError:
        raise ProtocolError(f"unknown command {command}") from None


def pack_response(status: int, message: str = "") -> bytes:
    body = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    return _RESPONSE.pack(RESPONSE_MAGIC, status, 0, len(body)) + body


def read_response(sock: socket.socket, what: str) -> None:
    """Wait for the answer to a request.

    :raises PeerError: the peer answered Error. :raises ProtocolError: no valid answer."""
    magic, status, _flags, length = _RESPONSE.unpack(recv_exact(sock, HEADER_SIZE, f"the answer to {what}"))
    if magic != RESPONSE_MAGIC or status not in (OK, ERROR):
        raise ProtocolError(f"the answer to {what} is not a vmmkit migration response")
    if length > MAX_MESSAGE:
        raise ProtocolError(f"the answer to {what} announces {length} bytes (at most {MAX_MESSAGE})")
    body = recv_exact(sock, length, f"the answer to {what}")
    if status == ERROR:
        raise PeerError(f"the destination refused {what}: {body.decode('utf-8', 'replace')}")


def send_request(sock: socket.socket, command: Command, payload: bytes = b"", *,
                 fds: Sequence[int] = ()) -> None:
    data = pack_request(command, len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def call(sock: socket.socket, command: Command, payload: bytes = b"", *, fds: Sequence[int] = ()) -> None:
    """Send one request and wait for its OK. :raises MigrationError: the peer refused or failed."""
    send_request(sock, command, payload, fds=fds)
    read_response(sock, command.name)


def read_request(sock: socket.socket, *, allow_fds: bool = False) -> tuple[Command, int, list[int]]:
    """The next request's ``(command, payload length, fds)``; the payload is left on the stream.

    :raises ProtocolError: EOF, a malformed header, or fds where none may come."""
    fds: list[int] = []
    if allow_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, HEADER_SIZE, 4)
        if not data:
            raise ProtocolError("the peer closed the connection")
        header = data + recv_exact(sock, HEADER_SIZE - len(data), "a request header")
    else:
        header = recv_exact(sock, HEADER_SIZE, "a request header")
    return (*unpack_request(header), fds)


# -- payloads -------------------------------------------------------------------------------------


def encode_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def decode_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what}: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    return document


def read_json(sock: socket.socket, length: int, what: str) -> dict[str, Any]:
    if length > MAX_JSON:
        raise ProtocolError(f"{what}: {length} bytes is more than {MAX_JSON}")
    return decode_json(recv_exact(sock, length, what), what)


def start_payload(vmmkit_version: str, *, local: bool) -> bytes:
    return encode_json({"protocol": PROTOCOL, "version": VERSION, "vmmkit": vmmkit_version, "local": local})


def check_start(document: dict[str, Any]) -> bool:
    """The ``local`` flag of a checked START payload.

    :raises ProtocolError: another protocol or version."""
    if document.get("protocol") != PROTOCOL:
        raise ProtocolError(f"START: not a {PROTOCOL} stream")
    if document.get("version") != VERSION:
        raise ProtocolError(f"START: protocol version {document.get('version')!r} (sender vmmkit "
                            f"{document.get('vmmkit')!r}); this receiver speaks version {VERSION}")
    local = document.get("local")
    if not isinstance(local, bool):
        raise ProtocolError("START: 'local' must be true or false")
    return local


def pack_ranges(ranges: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(_RANGE.pack(start, length) for start, length in ranges)


def unpack_ranges(data: bytes) -> list[tuple[int, int]]:
    """The ``(guest address, length)`` pairs of a MEMORY table. :raises ProtocolError: malformed."""
    if len(data) % _RANGE.size:
        raise ProtocolError(f"MEMORY: a table of {len(data)} bytes is not a whole number of ranges")
    if len(data) // _RANGE.size > MAX_RANGES:
        raise ProtocolError(f"MEMORY: more than {MAX_RANGES} ranges in one table")
    return [_RANGE.unpack_from(data, offset) for offset in range(0, len(data), _RANGE.size)]


def range_table_size(count: int) -> int:
    return count * _RANGE.size


def pack_memory_fd(slot: int, start: int, size: int, offset: int = 0) -> bytes:
    if offset:
        return _MEMORY_FD_AT.pack(slot, 0, start, size, offset)
    return _MEMORY_FD.pack(slot, 0, start, size)


def unpack_memory_fd(data: bytes) -> tuple[int, int, int, int]:
    """``(slot, guest address, size, file offset)``."""
    if len(data) == _MEMORY_FD_AT.size:
        slot, _pad, start, size, offset = _MEMORY_FD_AT.unpack(data)
        return slot, start, size, offset
    if len(data) != _MEMORY_FD.size:
        raise ProtocolError(f"MEMORY_FD: {len(data)} bytes, expected {_MEMORY_FD.size} or {_MEMORY_FD_AT.size}")
    slot, _pad, start, size = _MEMORY_FD.unpack(data)
    return slot, start, size, 0


MEMORY_FD_SIZE: Final = _MEMORY_FD.size
#: A MEMORY_FD payload with a file offset.
MEMORY_FD_AT_SIZE: Final = _MEMORY_FD_AT.size


def close_fds(fds: Iterable[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


__all__ = ["Command", "MigrationError", "PeerError", "ProtocolError"]
