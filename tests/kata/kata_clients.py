"""The two ways Kata Containers talks to the VMM's API socket, byte for byte.

- :class:`GoClient`: the Go runtime (``clh.go``) through the generated OpenAPI client on Go's
  ``net/http`` (one pooled keep-alive connection, redialled when the server closed it; a
  ``context.WithTimeout`` deadline per call), and its hand-written ``vm.add-net`` request
  (``httputil.DumpRequest`` of the request, sent with the tap fds in one ``WriteMsgUnix``).
- :class:`RustClient`: the Rust runtime (``ch-config/src/ch_api.rs``) through Cloud
  Hypervisor's ``api_client`` crate: ONE ``UnixStream`` for the sandbox's life, a request
  written in pieces (the first with the fds), the answer read 256 bytes at a time until
  ``Content-Length`` bytes of body (or the end of the head when there is no such header).

Each call returns a :class:`Reply`; a call that does not finish within its deadline raises
:class:`KataTimeout` (Kata would have given up), one the runtime treats as an error raises
:class:`KataError`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from typing import Any

import attrs

from vmmkit.api.http import send_with_fds

#: clh.go: clhAPITimeout, clhCreateAndBootVMMinimumTimeout, clhHotPlugAPITimeout,
#: clhStopSandboxTimeout, clhTimeout (seconds); isClhRunning pings every 10 ms.
API_TIMEOUT = 1.0
CREATE_BOOT_TIMEOUT = 10.0
HOTPLUG_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
LAUNCH_TIMEOUT = 10.0
PING_INTERVAL = 0.010
#: The Go client's Accept per endpoint (api_default.go: localVarHTTPHeaderAccepts).
_GO_ACCEPTS_JSON = {"vmm.ping", "vm.info", "vm.add-disk", "vm.add-device", "vm.add-fs", "vm.add-vsock"}
_GO_USER_AGENT = "OpenAPI-Generator/1.0.0/go"  # configuration.go: NewConfiguration


class KataTimeout(AssertionError):
    """The call did not finish before Kata's deadline for it."""


class KataError(AssertionError):
    """The runtime would report this call as failed."""


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]  #: lower-case names; the status line's reason phrase is "reason"
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def go_json(value: Any) -> bytes:
    """Go's ``json.Marshal`` of a generated model: the model's ``MarshalJSON`` builds a
    ``map[string]interface{}``, which ``encoding/json`` writes compact with sorted keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] != "HTTP/1.1":
        raise KataError(f"not an HTTP/1.1 status line: {lines[0]!r}")
    headers: dict[str, str] = {"reason": parts[2] if len(parts) > 2 else ""}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class GoClient:
    """``chclient.NewAPIClient(cfg).DefaultApi`` over ``net.DialUnix`` (clh.go: CreateVM)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._conn: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, deadline: float) -> socket.socket:
        if self._conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.connect(self.socket_path)
            self._conn, self._buffer = conn, b""
        return self._conn

    def call(self, method: str, endpoint: str, body: Any = None, *, timeout: float = API_TIMEOUT) -> Reply:
        """One generated-client call (``VmInfoGet``, ``CreateVM``...): Go's request head, then
        the answer; ``>= 300`` is an error (``GenericOpenAPIError``)."""
        data = go_json(body) if body is not None else b""
        head = [f"{method} /api/v1/{endpoint} HTTP/1.1", "Host: localhost", f"User-Agent: {_GO_USER_AGENT}"]
        if method != "GET":
            head.append(f"Content-Length: {len(data)}")  # Go sends 0 for a PUT without a body
        if endpoint in _GO_ACCEPTS_JSON:
            head.append("Accept: application/json")
        if body is not None:
            head.append("Content-Type: application/json")
        head.append("Accept-Encoding: gzip")  # added by http.Transport
        reply = self._exchange(("\r\n".join(head) + "\r\n\r\n").encode() + data, (), timeout)
        if reply.status >= 300:  # GenericOpenAPIError{error: resp.Status}: "429 Too Many Requests"
            raise KataError(f"{endpoint}: {reply.status} {reply.headers['reason']} {reply.body[:300]!r}")
        if reply.body and endpoint in _GO_ACCEPTS_JSON:
            content_type = reply.headers.get("content-type", "")
            if "json" not in content_type:  # client.go decode(): jsonCheck, else "undefined response type"
                raise KataError(f"{endpoint}: undefined response type {content_type!r}")
            reply.json()
        return reply

    def add_net(self, net: dict[str, Any], fds: Sequence[int], *, timeout: float) -> Reply:
        """``vmAddNetPutRequest``: its own connection, ``DumpRequest`` bytes with the fds."""
        data = go_json(net)
        head = ["PUT /api/v1/vm.add-net HTTP/1.1", "Host: localhost", "Accept: application/json",
                f"Content-Length: {len(data)}", "Content-Type: application/json"]
        message = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(self.socket_path)
            send_with_fds(conn, message, fds)
            status, headers, body = _read_go_response(conn, b"", deadline)[0]
        reply = Reply(status, headers, body, time.monotonic() - start)
        if status not in (200, 204):
            raise KataError(f"vm.add-net: {status} {body[:300]!r}")
        return reply

    def _exchange(self, message: bytes, fds: Sequence[int], timeout: float) -> Reply:
        start = time.monotonic()
        deadline = start + timeout
        for attempt in (0, 1):
            conn = self._connection(deadline)
            try:
                send_with_fds(conn, message, fds)
                (status, headers, body), self._buffer = _read_go_response(conn, self._buffer, deadline)
                break
            except (BrokenPipeError, ConnectionResetError, _Closed):
                self.close()  # the server closed the pooled connection: Go dials again
                if attempt:
                    raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers, body, time.monotonic() - start)


class _Closed(Exception):
    pass


def _read_go_response(conn: socket.socket, buffer: bytes,
                      deadline: float) -> tuple[tuple[int, dict[str, str], bytes], bytes]:
    """One response (``http.ReadResponse``): head, then ``Content-Length`` bytes."""
    def fill() -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KataTimeout("the answer did not come within Kata's deadline")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise KataTimeout("the answer did not come within Kata's deadline") from None
        if not chunk:
            raise _Closed()
        return chunk

    while b"\r\n\r\n" not in buffer:
        buffer += fill()
    raw_head, buffer = buffer.split(b"\r\n\r\n", 1)
    status, headers = _parse_head(raw_head)
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        buffer += fill()
    return (status, headers, buffer[:length]), buffer[length:]


class RustClient:
    """``api_command`` of ch_api.rs over ``simple_api_full_command[_with_fds]_and_response``."""

    def __init__(self, socket_path: str, *, deadline: float) -> None:
        """``cloud_hypervisor_setup_comms``: connect every 50 ms until the socket answers."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(socket_path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise KataTimeout(f"API socket connect timed out ({socket_path})") from None
                time.sleep(0.050)
        self.sock = sock
        self.sock.settimeout(600.0)  # the runtime has no per-call limit; this only stops a hang

    def close(self) -> None:
        self.sock.close()

    def call(self, method: str, endpoint: str, body: Any = None, fds: Sequence[int] = (), *,
             pretty: bool = False) -> Reply:
        """Returns the reply; raises :class:`KataError` for any status but 100, 200, 204.
        ``pretty``: ``serde_json::to_string_pretty`` (vm.create), else ``to_string``."""
        start = time.monotonic()
        data = None if body is None else json.dumps(body, indent=2 if pretty else None,
                                                     separators=None if pretty else (",", ":")).encode()
        first = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n".encode()
        send_with_fds(self.sock, first, fds)
        if data is not None:
            self.sock.sendall(f"Content-Length: {len(data)}\r\n".encode())
        self.sock.sendall(b"\r\n")
        if data is not None:
            self.sock.sendall(data)
        status, headers, body_bytes = self._parse_http_response()
        reply = Reply(status, headers, body_bytes, time.monotonic() - start)
        if status not in (100, 200, 204):
            raise KataError(f"{endpoint}: Server responded with error {status}: {body_bytes[:300]!r}")
        return reply

    def _parse_http_response(self) -> tuple[int, dict[str, str], bytes]:
        """``parse_http_response``: 256-byte reads; the body is what follows the head once
        ``Content-Length`` (case-sensitive ``"Content-Length: "``) bytes are in."""
        res = b""
        body_offset: int | None = None
        content_length: int | None = None
        while True:
            chunk = self.sock.recv(256)
            if not chunk:
                break
            res += chunk
            res.decode("utf-8")  # str::from_utf8(..).unwrap() panics on a split character
            end = res.find(b"\r\n\r\n")
            if end >= 0:
                body_offset = end + 4
                at = res.find(b"Content-Length: ")
                if at < 0:
                    break
                content_length = int(res[at + 16:res.index(b"\r", at)].strip())
            if body_offset is not None and content_length is not None and len(res) >= body_offset + content_length:
                break
        if body_offset is None:
            raise KataError(f"no HTTP head in {res[:200]!r} (the connection was closed)")
        status, headers = _parse_head(res[:body_offset - 4])
        body = res[body_offset:] if content_length is not None else b""
        return status, headers, body
