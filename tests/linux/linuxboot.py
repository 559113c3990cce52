"""Booting the team's Linux test kernel on vmmkit or on QEMU, with the project's initramfs:
the commands, a network namespace with a tap for each VM, and a run that timestamps every
line of the guest's console. Shared by ``tests/linux/`` and ``bench/linux.py``.

Both VMMs get the same guest: 2 vCPUs, 128 MiB, a virtio-blk disk (a fresh 64 MiB raw image),
a virtio-net NIC with a fixed MAC on a tap whose host end is ``10.0.2.1/24``, a virtio-rng, a
virtio console written to a file, and the 16550 serial console; the kernel command line ends
with the ``/init`` arguments (``net=`` and ``pattern=``, see ``init.sh``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from attrs import define, field

REPO = Path(__file__).resolve().parents[2]
#: The team's Linux kernel (``../shared/guests/linux`` next to the repository).
LINUX_DIR = REPO.parent / "shared" / "guests" / "linux"
QEMU = "qemu-system-x86_64"

GUEST_ADDRESS = "10.0.2.15/24"
HOST_ADDRESS = "10.0.2.1"
HOST_MASK = "255.255.255.0"
GUEST_MAC = "52:54:00:12:34:56"
DISK_SIZE = 64 << 20
PATTERN_OFFSET = 1 << 20  #: where /init writes the pattern (init.sh: 4 KiB blocks, seek=256)
PATTERN_SIZE = 4096
#: where /init writes the pattern again from each CPU with a queue of its own (at + 4 KiB * cpu)
PER_QUEUE_PATTERN_OFFSET = 2 << 20
#: ``pty.legacy_count=0``: no BSD ptys (nothing here uses them). Registering the default 256
#: takes ~20 s of each boot on a kvm_pvm host, whose guest kernel code is emulated.
BASE_CMDLINE = "console=ttyS0 panic=-1 pty.legacy_count=0"
INIT_PREFIX = "VMMKIT-INIT: "
INFO_PREFIX = "VMMKIT-INFO: "
HVC_LINE = "VMMKIT-HVC0: hello from hvc0"


def scaled_timeout(seconds: float) -> float:
    """A slow test's time limit on an otherwise idle host, stretched by
    ``$VMMKIT_LINUX_TIMEOUT_FACTOR`` on a host shared with other work (a kvm_pvm boot that takes
    ~90 s alone took 20 minutes at a load average of 16)."""
    return seconds * float(os.environ.get("VMMKIT_LINUX_TIMEOUT_FACTOR", "1"))


#: Extra variants of the slow Linux tests (another transport, another arrival path) run only
#: with ``VMMKIT_LINUX_ALL=1``: each boots Linux again, and the default run keeps one proof per
#: feature so that CI stays within its time budget.
ALL_VARIANTS = os.environ.get("VMMKIT_LINUX_ALL") == "1"
extra_variant = pytest.mark.skipif(
    not ALL_VARIANTS, reason="an extra variant of a slow Linux test (one more boot): VMMKIT_LINUX_ALL=1 runs it")


def linux_missing_reason(directory: Path = LINUX_DIR) -> str | None:
    """Why the Linux tests cannot run here (the kernel is absent), or ``None``."""
    for name in ("vmlinux", "bzImage"):
        if not (directory / name).is_file():
            return f"{directory / name} is absent (the team's Linux test kernel, ../shared/guests/linux)"
    return None


def block_pattern(word: str) -> bytes:
    """The 4 KiB ``init.sh`` writes to the disk at 1 MiB for ``pattern=<word>``."""
    line = (word + "\n").encode()
    return (line * (PATTERN_SIZE // len(line) + 1))[:PATTERN_SIZE]


def init_args(pattern: str, *, net: bool) -> str:
    args = [f"pattern={pattern}"]
    if net:
        args.insert(0, f"net={GUEST_ADDRESS},{HOST_ADDRESS}")
    return " ".join(args)


# -- network namespaces ----------------------------------------------------------------------


def netns_missing_reason() -> str | None:
    """Why this process cannot make network namespaces with taps, or ``None``."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


class NetNamespace:
    """A throw-away network namespace (``ip netns``): the VMM runs inside it, so its tap and
    the host end's address are invisible to the rest of the machine."""

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def add_tap(self, tap: str, address: str) -> None:
        """A persistent tap with ``address`` on its host end (for QEMU, which opens it)."""
        _ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip("-n", self.name, "addr", "add", address, "dev", tap)
        _ip("-n", self.name, "link", "set", tap, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


# -- commands --------------------------------------------------------------------------------


@define
class GuestFiles:
    """The host files a boot uses: disk image, virtio console output, serial log."""

    directory: Path
    disk: Path = field(init=False)
    hvc: Path = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.disk = self.directory / "disk.img"
        self.hvc = self.directory / "hvc0.txt"
        with open(self.disk, "wb") as image:
            image.truncate(DISK_SIZE)
        self.hvc.write_text("")


def vmmkit_command(
    kernel: Path, initramfs: Path, files: GuestFiles, *, pattern: str, net: bool, transport: str = "pci",
    cpus: int = 2, extra: Sequence[str] = (),
) -> list[str]:
    cmd = [
        sys.executable, "-m", "vmmkit", "--kernel", str(kernel), "--initramfs", str(initramfs),
        "--cpus", f"boot={cpus}", "--memory", "size=128M", "--serial", "tty",
        "--disk", f"path={files.disk},num_queues={cpus}", "--rng", "src=/dev/urandom",
        "--console", f"file={files.hvc}", "--platform", f"virtio_transport={transport}",
        "--cmdline", f"{BASE_CMDLINE} -- {init_args(pattern, net=net)}",
    ]
    if net:
        cmd += ["--net", f"tap=vmmkit0,ip={HOST_ADDRESS},mask={HOST_MASK},mac={GUEST_MAC}"]
    return [*cmd, *extra]


def qemu_command(
    kernel: Path, initramfs: Path, files: GuestFiles, *, pattern: str, tap: str | None, cpus: int = 2
) -> list[str]:
    """QEMU with TCG (its KVM cannot run these guests on a PVM host), a PC with the same
    devices over virtio-pci."""
    cmd = [
        QEMU, "-accel", "tcg", "-M", "pc", "-cpu", "max", "-smp", str(cpus), "-m", "128M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", f"{BASE_CMDLINE} -- {init_args(pattern, net=tap is not None)}",
        "-drive", f"file={files.disk},if=virtio,format=raw", "-global", f"virtio-blk-pci.num-queues={cpus}",
        "-device", "virtio-rng-pci",
        "-device", "virtio-serial-pci", "-chardev", f"file,id=hvc,path={files.hvc}",
        "-device", "virtconsole,chardev=hvc",
    ]
    if tap is not None:
        cmd += ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"]
    return cmd


# -- running ---------------------------------------------------------------------------------


@define
class BootResult:
    """What one boot printed, when, and how it ended."""

    name: str
    command: list[str]
    lines: list[tuple[float, str]] = field(factory=list)  #: (seconds since spawn, console line)
    stderr: str = ""
    returncode: int | None = None
    timed_out: bool = False
    elapsed: float = 0.0

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def init_lines(self) -> list[str]:
        """The ``VMMKIT-INIT:`` lines, without the prefix."""
        return [line.split(INIT_PREFIX, 1)[1] for _, line in self.lines if INIT_PREFIX in line]

    @property
    def info_lines(self) -> list[str]:
        return [line.split(INFO_PREFIX, 1)[1] for _, line in self.lines if INFO_PREFIX in line]

    def time_of(self, text: str) -> float | None:
        """Seconds from spawn to the first line containing ``text``."""
        return next((at for at, line in self.lines if text in line), None)

    def describe(self) -> str:
        """A summary for assertion messages: how it ended, and the last lines."""
        tail = "\n".join(line for _, line in self.lines[-40:])
        how = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return f"{self.name}: {how} after {self.elapsed:.0f} s\n--- last console lines ---\n{tail}\n" \
               f"--- stderr ---\n{self.stderr[-3000:]}"


class Boot:
    """A VMM process running in the background; :meth:`wait` collects its result."""

    def __init__(self, name: str, command: list[str], *, timeout: float, cleanup: Sequence[object] = ()) -> None:
        self.result = BootResult(name, command)
        self._timeout = timeout
        self._cleanup = list(cleanup)
        self._start = time.monotonic()
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._done = False

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.result.lines.append((time.monotonic() - self._start, line))

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        self.result.stderr = self._proc.stderr.read().decode("utf-8", "replace")

    def wait(self) -> BootResult:
        if self._done:
            return self.result
        remaining = max(0.0, self._timeout - (time.monotonic() - self._start))
        try:
            self.result.returncode = self._proc.wait(remaining)
        except subprocess.TimeoutExpired:
            self.result.timed_out = True
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self.result.returncode = self._proc.returncode
        self.result.elapsed = time.monotonic() - self._start
        for reader in self._readers:
            reader.join(timeout=10)
        for item in self._cleanup:
            close = getattr(item, "close", None)
            if close is not None:
                close()
        self._done = True
        return self.result

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self.wait()
