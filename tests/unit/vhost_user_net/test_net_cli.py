"""``vmmkit-vhost-user net`` usage errors: exit 2 with the option named, no traceback, no socket
left behind; options peers have that this backend does not implement are refused by name. The
tap cases need root (a tap is opened, inside a throw-away network namespace)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from net_frontend import NetNs, unavailable_reason

DAEMON = [sys.executable, "-m", "vmmkit_vhost_user.cli", "net"]


def run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *DAEMON, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    ((), "--socket"),
    (("--socket", "SOCK", "--mac", "52:54:00:00:00:01"), "--mac: not supported: the guest's MAC is the frontend's"),
    (("--socket", "SOCK", "--client"), "--client: not supported"),
    (("--socket", "SOCK", "--queue-size", "256"), "--queue-size: not supported"),
    (("--socket", "SOCK", "--thread-pool-size", "4"), "--thread-pool-size: not supported"),
    (("--socket", "SOCK", "--num-queues", "4"), "--num-queues: not supported: the queues come in pairs"),
    (("--socket", "SOCK", "--queues", "0"), "--queues 0"),
    (("--socket", "SOCK", "--queues", "257"), "--queues 257"),
    (("--socket", "SOCK", "--ip", "10.0.0.1"), "--ip and --mask go together"),
    (("--socket", "SOCK", "--ip", "10.0.0.300", "--mask", "255.255.255.0"), "--ip 10.0.0.300"),
    (("--socket", "SOCK", "--host-mac", "52:54:00:00:01"), "--host-mac"),
    (("--socket", "SOCK", "--mtu", "20"), "--mtu 20"),
    (("--socket", "SOCK", "--offload", "on"), "unrecognized arguments: --offload"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    sock = tmp_path / "net.sock"
    result = run(*(str(sock) if a == "SOCK" else a for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not sock.exists()


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize(("args", "message"), [
    (("--tap", "x" * 16), "--tap: tap name"),
    (("--tap", "x" * 16, "--queues", "2"), "--tap: tap name"),
    (("--tap", "tap0", "--queues", "2"), "is it a multi-queue tap?"),  # tap0 was made single-queue
])
def test_a_tap_that_cannot_be_opened_is_a_usage_error(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    ns = NetNs()
    try:
        sock = tmp_path / "net.sock"
        result = run("--socket", str(sock), *args, prefix=tuple(ns.prefix))
    finally:
        ns.close()
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not sock.exists()
