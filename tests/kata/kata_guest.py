"""What the Kata replays share: the guest (the team's kernel, an initramfs with ``kata_init.sh``
and the agent stand-in), the VMM process launched as Kata launches it, taps opened as Kata
opens them, and the host end of the agent's vsock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from initramfs import Entry, initramfs_entries, missing_busybox_reason, newc_archive
from kata_clients import LAUNCH_TIMEOUT, PING_INTERVAL, GoClient, KataError, KataTimeout, Reply
from linuxboot import LINUX_DIR, linux_missing_reason, scaled_timeout

from vmmkit.testing import kvm_unusable_reason

HERE = Path(__file__).resolve().parent
INIT = HERE / "kata_init.sh"
AGENT_SOURCE = HERE / "kata_agent.c"
#: The vmmkit command Kata's configuration names as ``path`` (the console script).
VMMKIT = Path(sys.executable).parent / "vmmkit"
DAEMON = Path(sys.executable).parent / "vmmkit-vhost-user"
AGENT_PORT = 1024
#: What the host asks the agent stand-in to run (so that the initramfs links these applets).
AGENT_COMMANDS = b"cat ls grep echo sh test wc tr head"
#: How long the guest may take to boot and start its agent (~1 min alone on kvm_pvm; this is
#: the test's limit, not one of Kata's API timeouts: Kata's agent dial timeout is its own).
BOOT_TIMEOUT = scaled_timeout(600.0)
#: How long a dial of the agent is retried (Kata's agent client: ``dial_timeout``, 45 s by default).
DIAL_TIMEOUT = 45.0

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def missing_reason(*, need_daemon: bool = False) -> str | None:
    """Why the replay cannot boot its guest here, or ``None``."""
    reasons = [linux_missing_reason(LINUX_DIR), missing_busybox_reason(), kvm_unusable_reason()]
    if shutil.which("gcc") is None:
        reasons.append("gcc not found (the agent stand-in is built with gcc -static)")
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0:
        reasons.append("opening taps needs root and /dev/net/tun (Kata passes tap fds to vm.add-net)")
    if need_daemon and not DAEMON.is_file():
        reasons.append("vmmkit-vhost-user is not installed (the virtio-fs daemon)")
    return next((reason for reason in reasons if reason), None)


def build_initramfs(workdir: Path) -> Path:
    agent = workdir / "kata-agent"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(agent), str(AGENT_SOURCE)],
                   check=True, capture_output=True)
    entries = initramfs_entries(init=INIT, scripts=[AGENT_COMMANDS])
    entries.insert(-1, Entry("bin/kata-agent", stat.S_IFREG | 0o755, agent.read_bytes()))
    path = workdir / "kata-init.cpio"
    path.write_bytes(newc_archive(entries))
    return path


def make_rootfs(path: Path, size: int = 8 << 20) -> Path:
    """Kata's guest image stand-in: a raw file the guest must see read-only."""
    with path.open("wb") as image:
        image.truncate(size)
    return path


def open_tap(name: str) -> int:
    """A tap as Kata's network endpoints open one (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``), one
    queue pair: its fd goes to ``vm.add-net`` in SCM_RIGHTS. The tap lives as long as the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


class Vmm:
    """The VMM process: ``<path> --api-socket <socket> [-v] --seccomp false`` (clh.go launchClh
    with ``disable_seccomp``, ``-v`` with debug; runtime-rs adds the same flags), stdout and
    stderr to one log (Kata sends both to its console)."""

    def __init__(self, workdir: Path, name: str, *, extra: tuple[str, ...] = (), verbose: bool = True) -> None:
        self.socket = str(workdir / f"{name}-clh-api.sock")
        self.log_path = workdir / f"{name}-vmm.log"
        self._log = self.log_path.open("wb")
        self.launched = time.monotonic()
        flags = ["-v"] if verbose else []
        command = [str(VMMKIT), "--api-socket", self.socket, *flags, "--seccomp", "false", *extra]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd="/")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def go_wait_vmm(vmm: Vmm, client: GoClient) -> float:
    """``isClhRunning(clhTimeout)``: ``vmm.ping`` (1 s each) every 10 ms until it answers, for at
    most 10 s from the launch; the seconds it took."""
    while True:
        assert vmm.process.poll() is None, f"the VMM exited at once: {vmm.log()[-2000:]}"
        try:
            client.call("GET", "vmm.ping")
            return time.monotonic() - vmm.launched
        except (OSError, KataError, KataTimeout):
            client.close()
        if time.monotonic() - vmm.launched > LAUNCH_TIMEOUT:
            raise KataTimeout(f"Failed to connect to API (timeout {LAUNCH_TIMEOUT:g}s)")
        time.sleep(PING_INTERVAL)


def _dial_agent(vsock_socket: str, timeout: float) -> socket.socket:
    """One hybrid vsock dial: ``CONNECT 1024`` answered ``OK <port>``."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(vsock_socket)
        conn.sendall(f"CONNECT {AGENT_PORT}\n".encode())
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                raise ConnectionError(f"the hybrid vsock closed after {answer!r} (no answer from port {AGENT_PORT})")
            answer += chunk
        if not answer.startswith(b"OK "):
            raise ConnectionError(f"CONNECT {AGENT_PORT} answered {answer!r}")
        return conn
    except BaseException:
        conn.close()
        raise


def agent_run(vsock_socket: str, command: str, timeout: float = 60.0,
              dial_timeout: float = DIAL_TIMEOUT) -> tuple[int, str]:
    """Run ``command`` through the agent stand-in: hybrid vsock ``CONNECT 1024`` (dialled again
    until :data:`DIAL_TIMEOUT`, as Kata's agent client does: the VMM closes a handshake the
    guest has not answered within its vsock connect timeout, seconds that a loaded kvm_pvm
    guest can miss), the line, the output until the agent closes. Returns (status, output)."""
    deadline = time.monotonic() + dial_timeout
    while True:
        try:
            conn = _dial_agent(vsock_socket, timeout)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with conn:
        conn.sendall(command.encode() + b"\n")
        output = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            output += chunk
    text = output.decode(errors="replace")
    body, _, tail = text.rpartition("\nEXIT ")
    return int(tail.strip()), body


def wait_agent(vsock_socket: str, vmm: Vmm, timeout: float = BOOT_TIMEOUT) -> None:
    """Kata's agent check: dial the agent through the hybrid vsock until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, output = agent_run(vsock_socket, "echo ready", timeout=30.0, dial_timeout=0.0)
            if status == 0 and output.strip() == "ready":
                return
        except OSError:
            pass
        assert vmm.process.poll() is None, f"the VMM exited ({vmm.process.returncode}): {vmm.log()[-3000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent stand-in did not answer within {timeout:.0f} s:\n{vmm.log()[-3000:]}")
        time.sleep(1.0)


def init_lines(vsock_socket: str) -> list[str]:
    """``kata_init.sh``'s report, read through the agent stand-in."""
    status, output = agent_run(vsock_socket, "cat /run/kata-init.log")
    assert status == 0, output
    return [line.strip() for line in output.splitlines() if line.strip()]


def wait_guest(check: Callable[[], bool], what: str, timeout: float = scaled_timeout(180.0)) -> None:
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        try:
            if check():
                return
        except OSError as exc:  # the agent stand-in is restarting: /init says so (see agent_exits)
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest did not {what} within {timeout:.0f} s (last error: {error})")
        time.sleep(1.0)


def agent_exits(vsock_socket: str) -> list[str]:
    """The agent stand-in's exits /init saw (it must have none)."""
    return [line for line in init_lines(vsock_socket) if line.startswith("agent exited")]


def within(reply: Reply, limit: float, what: str) -> Reply:
    """Kata's deadline for a call: the answer came in time (a later one is a failed call)."""
    assert reply.seconds <= limit, f"{what} took {reply.seconds:.2f} s; Kata gives it {limit:g} s"
    return reply
