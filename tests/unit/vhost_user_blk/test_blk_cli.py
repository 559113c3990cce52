"""``vmmkit-vhost-user blk`` usage errors: exit 2 with the option named, no traceback, nothing
left behind; a locked image (another daemon or VM writing it) is refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from blk_frontend import Daemon

DAEMON = [sys.executable, "-m", "vmmkit_vhost_user.cli", "blk"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    ((), "--socket-path, --blk-file"),
    (("--blk-file", "IMG"), "--socket-path"),
    (("--socket-path", "SOCK", "--blk-file", "/nonexistent/disk.img"), "does not exist"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--num-queues", "0"), "--num-queues"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--serial", "x" * 21), "--serial"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--image-type", "vmdk"), "--image-type"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--thread-pool-size", "1000"), "--thread-pool-size"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--cache", "none"), "--cache"),
    (("--socket-path", "SOCK", "--blk-file", "IMG", "--image-type", "qcow2"), "qcow2"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    sock = tmp_path / "blk.sock"
    result = run(*(str(image) if a == "IMG" else str(sock) if a == "SOCK" else a for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not sock.exists()


def test_an_image_another_daemon_writes_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    first = Daemon(Path("/tmp") / f"vublk-lock-{tmp_path.name[-12:]}.sock", image)
    try:
        result = run("--socket-path", str(tmp_path / "b.sock"), "--blk-file", str(image))
        assert result.returncode == 2 and "locked by another user" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        first.stop()
