"""A small, strict HTTP/1.1 reader and writer for the management API's Unix socket.

Only what the API needs: ``Content-Length`` bodies (no chunked encoding), keep-alive, and file
descriptors passed as ``SCM_RIGHTS`` ancillary data with the request's bytes (how Cloud
Hypervisor's clients send tap fds). Everything a client sends is untrusted: sizes are bounded
(:data:`MAX_HEADER_BYTES`, :data:`MAX_BODY_BYTES`, :data:`MAX_FDS`), and anything malformed
raises :class:`HttpError` with the 4xx status to answer before the connection is closed.
"""

from __future__ import annotations

import array
import json
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

#: Request line plus headers.
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_HEADERS: Final = 64
#: The largest request body (a VmConfig is a few KiB).
MAX_BODY_BYTES: Final = 1024 * 1024
#: File descriptors accepted with one request (CH's clients send a tap fd per queue pair).
MAX_FDS: Final = 64
_RECV_CHUNK: Final = 64 * 1024

REASONS: Final[Mapping[int, str]] = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN_CHARS: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HttpError(Exception):
    """A request that cannot be served: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConnectionClosed(Exception):
    """The peer closed the connection (cleanly, between requests)."""


@attrs.frozen
class Request:
    method: str
    target: str
    version: str
    headers: Mapping[str, str]  #: lower-case names
    body: bytes
    fds: tuple[int, ...] = ()

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def json(cls, status: int, value: Any) -> Response:
        return cls(status, json.dumps(value).encode())

    @classmethod
    def error(cls, status: int, *messages: str, headers: Mapping[str, str] | None = None) -> Response:
        """An error in Cloud Hypervisor's shape: a JSON array of messages, outermost first."""
        return cls(status, json.dumps(list(messages)).encode(), headers=dict(headers or {}))

    def encode(self, *, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}", "Server: vmmkit API"]
        if self.status != 204:
            lines.append(f"Content-Type: {self.content_type}")
            lines.append(f"Content-Length: {len(self.body)}")
        lines.extend(f"{name}: {value}" for name, value in self.headers.items())
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if self.status == 204 else head + self.body


class RequestReader:
    """Reads requests from one connection, collecting the fds that arrive with their bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._eof = False

    def _fill(self, deadline: float | None = None) -> None:
        """One ``recvmsg``, waiting until ``deadline`` (``time.monotonic()``) at the latest, else
        as long as the socket's own timeout; raises ``ConnectionClosed`` at EOF and
        ``HttpError(408)`` past the deadline."""
        if self._eof:
            raise ConnectionClosed()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HttpError(408, "the request did not arrive in time")
            self._sock.settimeout(left)
        fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(_RECV_CHUNK, fd_space)
        except TimeoutError:
            if deadline is not None:
                raise HttpError(408, "the request did not arrive in time") from None
            raise
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close_fds()
            raise HttpError(400, f"too many file descriptors (at most {MAX_FDS})")
        if len(self._fds) > MAX_FDS:
            self.close_fds()
            raise HttpError(400, f"too many file descriptors (at most {MAX_FDS})")
        if not data:
            self._eof = True
            raise ConnectionClosed()
        self._buffer += data

    def close_fds(self) -> None:
        fds, self._fds = self._fds, []
        close_fds(fds)

    def read(self, request_timeout: float | None = None) -> Request:
        """The next request. Raises ``ConnectionClosed`` when the peer closed between
        requests, ``HttpError`` for a malformed or oversized one, ``OSError`` / ``TimeoutError``
        from the socket (its timeout bounds the wait for a request's first byte).

        With ``request_timeout``, the whole request (head and body) must arrive within that
        many seconds of its first byte: ``HttpError(408)`` otherwise. The deadline is not
        moved by the bytes that trickle in, so a client sending a byte a second cannot hold a
        connection (and a server thread) for long."""
        deadline: float | None = None
        while True:
            if deadline is None and request_timeout is not None and self._buffer:
                deadline = time.monotonic() + request_timeout
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buffer) > MAX_HEADER_BYTES:
                raise HttpError(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
            try:
                self._fill(deadline)
            except ConnectionClosed:
                if self._buffer.strip():
                    raise HttpError(400, "connection closed in the middle of a request") from None
                raise
        if end > MAX_HEADER_BYTES:
            raise HttpError(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        method, target, version, headers = _parse_head(head)
        body = self._read_body(headers, deadline)
        fds, self._fds = tuple(self._fds), []
        return Request(method, target, version, headers, body, fds)

    def _read_body(self, headers: Mapping[str, str], deadline: float | None = None) -> bytes:
        if "transfer-encoding" in headers:
            raise HttpError(501, "Transfer-Encoding is not supported: send a Content-Length")
        raw = headers.get("content-length")
        if raw is None:
            return b""
        if not raw.isdigit() or len(raw) > 12:
            raise HttpError(400, f"invalid Content-Length {raw[:40]!r}")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body of {length} bytes is larger than {MAX_BODY_BYTES}")
        if len(self._buffer) < length and headers.get("expect", "").lower() == "100-continue":
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(self._buffer) < length:
            try:
                self._fill(deadline)
            except ConnectionClosed:
                raise HttpError(400, "connection closed before the whole body arrived") from None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return body


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request line and headers must be ASCII") from None
    lines = text.split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # RFC 9112 2.2: ignore empty lines before the request line
    if not lines:
        raise HttpError(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not set(method.encode()) <= _TOKEN_CHARS:
        raise HttpError(400, "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HttpError(505, f"unsupported HTTP version {version[:20]!r}")
        raise HttpError(400, "malformed request line")
    if not target.startswith("/") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        raise HttpError(400, "the request target must be an absolute path")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name.encode()) <= _TOKEN_CHARS:
            raise HttpError(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        if key == "content-length" and key in headers and headers[key] != value:
            raise HttpError(400, "conflicting Content-Length headers")
        headers[key] = value if key not in headers or key == "content-length" else f"{headers[key]}, {value}"
    return method, target, version, headers


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data``, the ``fds`` riding (``SCM_RIGHTS``) with its first bytes."""
    view = memoryview(data)
    if fds:
        sent = sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        view = view[sent:]
    if view:
        sock.sendall(view)


def close_fds(fds: Sequence[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
