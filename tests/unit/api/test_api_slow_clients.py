"""Slow and greedy clients cannot hold the API (issue 12, item 7): a request must arrive whole
within the request deadline however its bytes trickle in, one process may hold only so many
connections, and when all are taken a waiting one makes room for a new client."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.api.server import ApiServer, bind_unix_socket
from vmmkit.vmm import Vmm


@pytest.fixture
def strict_server(vmm: Vmm, short_dir: Path) -> Iterator[ApiServer]:
    path = str(short_dir / "api.sock")
    server = ApiServer(vmm, bind_unix_socket(path), path=path, idle_timeout=30.0, request_timeout=1.5,
                       max_connections=4, max_connections_per_peer=3)
    server.start()
    yield server
    server.close()


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_a_trickling_request_gets_408_at_the_deadline(strict_server: ApiServer) -> None:
    assert strict_server.path is not None
    sock = _connect(strict_server.path)
    started = time.monotonic()
    answer = b""
    with sock:
        for byte in b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)  # far below the 30 s idle timeout, each byte
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < 4


def test_one_process_cannot_take_every_connection(strict_server: ApiServer) -> None:
    assert strict_server.path is not None
    held = [_connect(strict_server.path) for _ in range(3)]
    try:
        extra = _connect(strict_server.path)
        with extra:
            assert extra.recv(4096).startswith(b"HTTP/1.1 429 ")
    finally:
        for sock in held:
            sock.close()


PING = """
import sys
import threading
from vmmkit.api.client import ApiClient, ApiError
print(ApiClient(sys.argv[1], timeout=10).ping()["pid"])
"""


def test_a_new_client_evicts_the_longest_waiting_connection(strict_server: ApiServer) -> None:
    """Four idle connections from two processes fill the server; a third process's ping is
    still answered (the oldest idle connection is closed to make room)."""
    assert strict_server.path is not None
    path = strict_server.path
    holder = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         "s = [socket.socket(socket.AF_UNIX) for _ in range(2)]\n"
         "[x.connect(sys.argv[1]) for x in s]\nprint('ok', flush=True)\ntime.sleep(30)", path],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        mine = [_connect(path) for _ in range(2)]
        time.sleep(0.2)
        result = subprocess.run([sys.executable, "-c", PING, path], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert ApiClient(path, timeout=5).ping()  # and again, from this process
        for sock in mine:
            sock.close()
    finally:
        holder.kill()
        holder.wait()


def test_the_client_waits_out_a_full_accept_queue(short_dir: Path) -> None:
    """A Unix socket with a full accept queue refuses ``connect`` at once with ``EAGAIN``; the
    client retries within its timeout instead of failing (the CI flake of stop 22)."""
    path = str(short_dir / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    queued = []
    for _ in range(8):  # fill the queue: later connects get EAGAIN
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            queued.append(sock)
        except BlockingIOError:
            sock.close()
            break
    else:
        pytest.fail("the accept queue never filled")

    def serve() -> None:
        time.sleep(0.3)
        for sock in queued:  # make room: the queued ones are taken, then the client's
            listener.accept()[0].close()
            sock.close()
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert ApiClient(path, timeout=5).request("GET", "vmm.ping").status == 200
    finally:
        server.join(5)
        listener.close()


def test_the_client_gives_up_on_a_full_queue_at_its_timeout(short_dir: Path) -> None:
    path = str(short_dir / "stuck.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    held = []
    for _ in range(8):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            held.append(sock)
        except BlockingIOError:
            sock.close()
            break
    started = time.monotonic()
    with pytest.raises(ApiError, match="accept queue stayed full"):
        ApiClient(path, timeout=0.3).request("GET", "vmm.ping")
    assert time.monotonic() - started < 2
    listener.close()
    for sock in held:
        sock.close()


def test_a_failing_admission_does_not_stop_the_accept_loop(vmm: Vmm, short_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong with one connection (here: reading its peer's credentials), the next
    client is still served: an accept loop that returned would leave the queue to fill for good."""
    import vmmkit.api.server as server_module

    calls = 0
    real_peer_pid = server_module._peer_pid

    def failing_once(conn: socket.socket) -> int | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected admission failure")
        return real_peer_pid(conn)

    monkeypatch.setattr(server_module, "_peer_pid", failing_once)
    path = str(short_dir / "api.sock")
    server = ApiServer(vmm, bind_unix_socket(path), path=path)
    server.start()
    try:
        with pytest.raises(ApiError):
            ApiClient(path, timeout=5).request("GET", "vmm.ping")  # closed without an answer
        assert ApiClient(path, timeout=5).request("GET", "vmm.ping").status == 200
        assert calls == 2
    finally:
        server.close()
