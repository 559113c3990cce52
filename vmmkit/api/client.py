"""A small client for the management API (vmmkit's or Cloud Hypervisor's).

::

    client = ApiClient("/run/vm.sock")
    client.create({"payload": {"kernel": "vmlinux"}})
    client.boot()
    client.add_net({"mac": "12:34:56:78:9a:bc"}, fds=[tap_fd])   # fds go as SCM_RIGHTS
    print(client.info()["state"])

One connection per request, as ``ch-remote`` does. A non-2xx answer raises
:class:`ApiError` with the status and the server's messages.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmmkit.api.http import send_with_fds
from vmmkit.errors import VmmError

API_ROOT = "/api/v1/"
_MAX_RESPONSE = 64 * 1024 * 1024


class ApiError(VmmError):
    """The server answered an error status (or no valid HTTP at all: ``status`` 0)."""

    def __init__(self, status: int, messages: Sequence[str], body: bytes = b"") -> None:
        self.status = status
        self.messages = list(messages)
        self.body = body
        text = "; ".join(self.messages) or "no message"
        super().__init__(f"the VMM answered {status}: {text}" if status else text)


@attrs.frozen
class ApiResponse:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiClient:
    def __init__(self, socket_path: str, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- raw requests ----------------------------------------------------------------------------

    def request(self, method: str, endpoint: str, body: Any = None, *, fds: Sequence[int] = (),
                raw_body: bytes | None = None, check: bool = True) -> ApiResponse:
        """``method`` on ``/api/v1/<endpoint>``; ``body`` is sent as JSON (or ``raw_body`` as
        is), ``fds`` with the request's bytes. Raises :class:`ApiError` for a non-2xx status
        unless ``check`` is false."""
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        head = [f"{method} {API_ROOT}{endpoint} HTTP/1.1", "Host: localhost", "Accept: */*", "Connection: close"]
        if data is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        message = ("\r\n".join(head) + "\r\n\r\n").encode() + (data or b"")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            self._connect(sock)
            try:
                send_with_fds(sock, message, fds)
                response = _read_response(sock)
            except TimeoutError:
                raise ApiError(0, [f"no answer from {self.socket_path} within {self.timeout:g} s"]) from None
            except OSError as exc:
                raise ApiError(0, [f"connection to {self.socket_path} failed: {exc.strerror or exc}"]) from None
        if check and not 200 <= response.status < 300:
            raise ApiError(response.status, _messages(response.body), response.body)
        return response

    def _connect(self, sock: socket.socket) -> None:
        """Connect within the timeout. A Unix socket whose accept queue is full refuses at once
        with ``EAGAIN`` (it never blocks, unlike TCP): a busy server, so try again shortly."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                sock.connect(self.socket_path)
                return
            except BlockingIOError as exc:
                if time.monotonic() + delay > deadline:
                    raise ApiError(0, [f"cannot connect to {self.socket_path}: "
                                       f"{exc.strerror or exc} (its accept queue stayed full)"]) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
            except OSError as exc:
                raise ApiError(0, [f"cannot connect to {self.socket_path}: {exc.strerror or exc}"]) from None

    def get(self, endpoint: str) -> Any:
        return self.request("GET", endpoint).json()

    def put(self, endpoint: str, body: Any = None, *, fds: Sequence[int] = ()) -> Any:
        return self.request("PUT", endpoint, body, fds=fds).json()

    # -- the API ---------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return dict(self.get("vmm.ping"))

    def shutdown_vmm(self) -> None:
        self.put("vmm.shutdown")

    def create(self, config: Mapping[str, Any]) -> None:
        self.put("vm.create", dict(config))

    def boot(self) -> None:
        self.put("vm.boot")

    def info(self) -> dict[str, Any]:
        return dict(self.get("vm.info"))

    def counters(self) -> dict[str, dict[str, int]]:
        return dict(self.get("vm.counters"))

    def pause(self) -> None:
        self.put("vm.pause")

    def resume(self) -> None:
        self.put("vm.resume")

    def shutdown(self) -> None:
        self.put("vm.shutdown")

    def reboot(self) -> None:
        self.put("vm.reboot")

    def power_button(self) -> None:
        self.put("vm.power-button")

    def delete(self) -> None:
        self.put("vm.delete")

    def nmi(self) -> None:
        self.put("vm.nmi")

    def add_disk(self, disk: Mapping[str, Any]) -> dict[str, str] | None:
        return self.put("vm.add-disk", dict(disk))  # type: ignore[no-any-return]

    def add_pmem(self, pmem: Mapping[str, Any]) -> dict[str, str] | None:
        return self.put("vm.add-pmem", dict(pmem))  # type: ignore[no-any-return]

    def add_net(self, net: Mapping[str, Any], fds: Sequence[int] = ()) -> dict[str, str] | None:
        return self.put("vm.add-net", dict(net), fds=fds)  # type: ignore[no-any-return]

    def add_device(self, device: Mapping[str, Any]) -> dict[str, str] | None:
        return self.put("vm.add-device", dict(device))  # type: ignore[no-any-return]

    def remove_device(self, device_id: str) -> None:
        self.put("vm.remove-device", {"id": device_id})


def _read_response(sock: socket.socket) -> ApiResponse:
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ApiError(0, ["the VMM closed the connection without answering"])
        buffer += chunk
        if len(buffer) > 1024 * 1024:
            raise ApiError(0, ["the VMM's answer has oversized headers"])
    end = buffer.index(b"\r\n\r\n")
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    rest = bytes(buffer[end + 4 :])
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ApiError(0, [f"not an HTTP answer: {lines[0][:80]!r}"])
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status in (204, 304) or 100 <= status < 200:
        return ApiResponse(status, reason, headers, b"")
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        size = int(length)
        if size > _MAX_RESPONSE:
            raise ApiError(0, [f"the VMM's answer is too large ({size} bytes)"])
        while len(rest) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return ApiResponse(status, reason, headers, rest[:size])
    while chunk := sock.recv(65536):  # no length: until the server closes
        rest += chunk
        if len(rest) > _MAX_RESPONSE:
            break
    return ApiResponse(status, reason, headers, rest)


def _messages(body: bytes) -> list[str]:
    try:
        value = json.loads(body)
    except ValueError:
        return [body.decode("utf-8", "replace")] if body else []
    if isinstance(value, list):
        return [str(item) for item in value]
    return [json.dumps(value)]
