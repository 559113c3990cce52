"""What the virtio-fs tests share: the host directory the guest gets, the
``vmmkit-vhost-user fs`` daemon serving it, and the checks of ``virtiofs_init.sh``'s lines and
of the directory afterwards. Used by ``tests/integration/test_vhost_user_fs_qemu.py`` (QEMU's
frontend) and ``tests/linux/test_linux_virtiofs.py`` (vmmkit's)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from initramfs import initramfs_entries, newc_archive

HERE = Path(__file__).resolve().parent
INIT = HERE / "virtiofs_init.sh"
PREFIX = "VMMKIT-FS: "
TAG = "myfs"
BIG = 1 << 20
DAEMON = Path(sys.executable).parent / "vmmkit-vhost-user"

#: The FUSE operations the guest script makes Linux send (each must have been served).
EXERCISED = {"INIT", "LOOKUP", "GETATTR", "SETATTR", "OPENDIR", "READDIRPLUS", "RELEASEDIR", "OPEN", "READ",
             "CREATE", "WRITE", "FLUSH", "FSYNC", "RELEASE", "MKDIR", "RENAME", "UNLINK", "RMDIR", "SYMLINK",
             "LINK", "READLINK", "STATFS", "SYNCFS", "DESTROY"}


def daemon_missing_reason() -> str | None:
    if not DAEMON.is_file():
        return "vmmkit-vhost-user is not installed (pip install -e plugins/vhost-user)"
    return None


def build_initramfs(path: Path) -> Path:
    path.write_bytes(newc_archive(initramfs_entries(init=INIT)))
    return path


def populate(share: Path, outside: Path) -> dict[str, bytes]:
    """Empty ``share`` (keeping the directory: the daemon holds it) and fill it for one boot;
    ``outside`` (the share's parent) gets a file the guest must not reach."""
    for child in share.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    big = os.urandom(BIG)
    (share / "hello.txt").write_text("hello from the host\n")
    (share / "big.bin").write_bytes(big)
    (share / "rename-me.txt").write_text("rename me\n")
    (share / "delete-me.txt").write_text("delete me\n")
    (share / "empty-dir").mkdir()
    (share / "truncate-me.txt").write_text("0123456789\n")
    os.symlink("/", share / "escape")
    os.symlink("..", share / "up")
    (outside / "outside-secret.txt").write_text("the host's secret\n")
    return {"big": big}


class Daemon:
    """``vmmkit-vhost-user fs`` serving ``share`` on ``workdir/vfs.sock``, logging to
    ``workdir/daemon.log``."""

    def __init__(self, workdir: Path, share: Path, *args: str) -> None:
        self.socket = workdir / "vfs.sock"
        self.log = workdir / "daemon.log"
        command = [str(DAEMON), "fs", "--socket-path", str(self.socket), "--shared-dir", str(share), "-v", *args]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.process.poll() is None, f"the daemon exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, "the daemon did not create its socket"
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM, a clean exit, and the daemon's log."""
        self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(30) == 0, self.log.read_text()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return self.log.read_text()


def fs_lines(output: str) -> list[str]:
    return [line.split(PREFIX, 1)[1].strip() for line in output.splitlines() if PREFIX in line]


def check_guest_and_share(lines: list[str], share: Path, outside: Path, made: dict[str, bytes],
                          outside_names: set[str]) -> None:
    """The guest's report and the host's directory after one run of ``virtiofs_init.sh``;
    ``outside_names``: the test's own files beside the share (nothing else may appear there)."""
    assert lines and lines[-1] == "done", lines
    failed = [line for line in lines if line.startswith(("FAILED", "ESCAPED"))]
    assert not failed, failed
    listed = {line.split(" ", 1)[1] for line in lines if line.startswith("ls ")}
    assert {"hello.txt", "big.bin", "rename-me.txt", "delete-me.txt", "empty-dir", "escape", "up"} <= listed
    assert "hello hello from the host" in lines
    assert f"big {hashlib.md5(made['big']).hexdigest()}  /mnt/big.bin" in lines
    assert "readlink /etc/passwd" in lines
    assert "stat 17 640" in lines
    assert any(line.startswith(f"df {TAG} ") for line in lines)
    # The symlink to "/" leads to the guest's own root (its initramfs), not the host's.
    escape_listing = {line.split(" ", 1)[1] for line in lines if line.startswith("escape-ls ")}
    assert "init" in escape_listing and "vfs.sock" not in escape_listing
    assert "ok no up" in lines and "ok no dotdot" in lines
    assert "newdir after.txt" in lines and "newdir renamed.txt" in lines
    assert "after-forget moved" in lines

    # The host's view of what Linux did.
    assert (share / "guest.txt").read_text() == "written by linux\n"
    assert (share / "guest.txt").stat().st_mode & 0o777 == 0o640
    assert (share / "guest-hardlink").stat().st_ino == (share / "guest.txt").stat().st_ino
    assert os.readlink(share / "guest-symlink") == "/etc/passwd"
    assert (share / "copy.bin").read_bytes() == made["big"][:300000]
    assert (share / "newdir" / "after.txt").read_text() == "moved\n"
    assert not (share / "newdir" / "before.txt").exists()
    assert (share / "newdir" / "renamed.txt").read_text() == "rename me\n"
    assert not (share / "rename-me.txt").exists()
    assert not (share / "delete-me.txt").exists()
    assert not (share / "empty-dir").exists()
    assert (share / "truncate-me.txt").read_bytes() == b"01234"
    assert time.gmtime((share / "hello.txt").stat().st_mtime)[:6] == (2001, 2, 3, 4, 5, 6)
    assert (outside / "outside-secret.txt").read_text() == "the host's secret\n"
    names = {p.name for p in outside.iterdir()}
    assert names <= outside_names | {"share", "outside-secret.txt"}, f"new files beside the share: {names}"


def requests_served(log: str) -> list[dict[str, int]]:
    """The daemon's per-frontend account of FUSE requests (logged when a frontend leaves)."""
    accounts = []
    for line in log.splitlines():
        if "FUSE requests served: " in line:
            pairs = line.split("FUSE requests served: ", 1)[1].split()
            accounts.append({name: int(count) for name, count in (pair.split("=") for pair in pairs)})
    return accounts


def check_requests(account: dict[str, int]) -> None:
    missing = EXERCISED - set(account)
    assert not missing, f"Linux never sent {sorted(missing)}: {account}"
    assert account.get("FORGET", 0) + account.get("BATCH_FORGET", 0) > 0, account
