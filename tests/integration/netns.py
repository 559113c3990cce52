"""A throw-away network namespace with a tap device, and the host side of the test guest's
``test=net`` (tests/guests/README.md): a responder that answers each ``vmmkit-ping <n>`` frame
(ethertype 0x88B5) with ``vmmkit-pong <n>`` sent back to the guest's MAC.

The VMM under test (QEMU, vmmkit) runs inside the namespace (``ip netns exec``, see
:meth:`NetNamespace.exec_prefix`) so it can open the tap; the responder's AF_PACKET socket is
created inside it from a helper thread (``setns`` changes only the calling thread's namespace,
and a socket stays in the namespace it was created in). Needs root (CAP_NET_ADMIN,
CAP_SYS_ADMIN) and ``ip`` (iproute2)::

    with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
        subprocess.run([*ns.exec_prefix(), "qemu-system-x86_64", ..., "-netdev",
                        "tap,id=n0,ifname=tap0,script=no,downscript=no", ...])
    assert responder.pings == [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator

ETH_P_VMMKIT = 0x88B5  #: IEEE 802 local experimental ethertype 1
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000
PING = b"vmmkit-ping "
PONG = b"vmmkit-pong "
#: The source MAC of the responder's frames (locally administered).
RESPONDER_MAC = bytes.fromhex("020000000001")
BROADCAST = b"\xff" * 6


def unavailable_reason() -> str | None:
    """Why network namespaces with taps cannot be made here, or ``None``."""
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces and taps needs root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetNamespace:
    """``ip netns add`` on entry, ``ip netns del`` (which also removes its taps) on exit."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"vmmkit-{os.getpid()}-{secrets.token_hex(3)}"

    def __enter__(self) -> NetNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            # No IPv6 chatter (router solicitations, MLD) on the taps.
            self.run(["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, cmd: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace, capturing its output."""
        return subprocess.run([*self.exec_prefix(), *cmd], capture_output=True, text=True,
                              timeout=timeout)

    def add_tap(self, name: str = "tap0") -> str:
        """A persistent tap, up, inside the namespace; the VMM attaches to it by name."""
        _ip("-n", self.name, "tuntap", "add", "dev", name, "mode", "tap")
        _ip("-n", self.name, "link", "set", name, "up")
        return name

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket created inside the namespace (from a short-lived thread)."""
        box: dict[str, object] = {}

        def make() -> None:
            try:
                _setns(self.path)
                box["sock"] = socket.socket(family, type, proto)
            except BaseException as exc:  # re-raised in the caller
                box["error"] = exc

        thread = threading.Thread(target=make, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["sock"]  # type: ignore[return-value]

    @contextlib.contextmanager
    def responder(self, tap: str) -> Iterator[PingResponder]:
        """A :class:`PingResponder` on ``tap`` for the duration of the ``with`` block."""
        sock = self.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        responder = PingResponder(sock, tap)
        responder.start()
        try:
            yield responder
        finally:
            responder.stop()


def pong_frame(dst: bytes, n: int | bytes, src: bytes = RESPONDER_MAC) -> bytes:
    """The reply to ``vmmkit-ping <n>``: padded to the 60-byte Ethernet minimum."""
    number = n if isinstance(n, bytes) else str(n).encode()
    frame = dst + src + struct.pack("!H", ETH_P_VMMKIT) + PONG + number
    return frame.ljust(60, b"\0")


def parse_ping(frame: bytes) -> tuple[bytes, bytes] | None:
    """(source MAC, number) of a ``vmmkit-ping <n>`` frame, else ``None``."""
    if len(frame) < 14 + len(PING) or struct.unpack_from("!H", frame, 12)[0] != ETH_P_VMMKIT:
        return None
    payload = frame[14:].split(b"\0", 1)[0]
    if not payload.startswith(PING):
        return None
    number = payload[len(PING):]
    if not number.isdigit():
        return None
    return frame[6:12], number


class PingResponder:
    """Answers ``vmmkit-ping <n>`` frames arriving on ``tap`` from a background thread.

    ``pings`` lists the numbers received (resends included), ``macs`` the source MACs,
    ``frames`` counts every frame that arrived from the guest."""

    def __init__(self, sock: socket.socket, tap: str) -> None:
        self.sock = sock
        self.tap = tap
        self.pings: list[int] = []
        self.macs: set[bytes] = set()
        self.destinations: set[bytes] = set()
        self.frames = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"responder-{tap}", daemon=True)
        sock.bind((tap, ETH_P_ALL))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                frame, address = self.sock.recvfrom(65536)
            except OSError as exc:
                self.errors.append(str(exc))
                return
            if address[2] == PACKET_OUTGOING:  # our own replies
                continue
            self.frames += 1
            ping = parse_ping(frame)
            if ping is None:
                continue
            source, number = ping
            self.pings.append(int(number))
            self.macs.add(source)
            self.destinations.add(frame[:6])
            try:
                self.sock.send(pong_frame(source, number))
            except OSError as exc:
                self.errors.append(str(exc))

