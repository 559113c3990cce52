"""``vmmkit-vhost-user`` on the command line: usage errors exit 2 with a message and no
traceback, virtiofsd options it does not implement are refused by name, and SIGTERM ends a
serving daemon cleanly (its socket removed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmmkit.vhost_user import protocol as vu

DAEMON = [sys.executable, "-m", "vmmkit_vhost_user.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    ((), "required"),
    (("fs", "--socket-path", "/tmp/x.sock"), "--shared-dir"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/nonexistent-dir"), "not a directory"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--thread-pool-size", "-1"), "thread-pool-size"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--thread-pool-size", "many"), "invalid int"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--tag", "t" * 37), "--tag"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--cache", "always"), "--cache"),
    (("fs", "--socket-path", "/tmp/x.sock", "--shared-dir", "/tmp", "--sandbox", "none"), "--sandbox"),
    (("gpu",), "invalid choice"),  # blk and net exist (vmmkit-vhost-user blk, net); gpu does not
])
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_socket_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("keep me")
    result = run("fs", "--socket-path", str(path), "--shared-dir", str(tmp_path))
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert path.read_text() == "keep me"


def test_sigterm_ends_the_daemon_and_removes_its_socket(tmp_path: Path) -> None:
    path = Path("/tmp") / f"vu-cli-{os.getpid()}.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a stale socket of an earlier run is replaced
    stale.close()
    daemon = subprocess.Popen([*DAEMON, "fs", "--socket-path", str(path), "--shared-dir", str(tmp_path),
                               "--thread-pool-size", "2"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.socket(socket.AF_UNIX)
                client.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                client.close()
                assert time.monotonic() < deadline and daemon.poll() is None
                time.sleep(0.05)
        vu.send(client, vu.Message(vu.FrontendRequest.GET_FEATURES))
        reply, _ = vu.recv(client)
        assert reply.is_reply and vu.unpack_u64(reply.payload) & (1 << 32)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        client.close()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.stderr is not None and "Traceback" not in daemon.stderr.read()
    assert not path.exists()
