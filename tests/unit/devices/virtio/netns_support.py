"""A throw-away network namespace for the virtio-net tests, and a thread living inside it.

``setns(CLONE_NEWNET)`` moves only the calling thread, so :class:`Netns` keeps one helper thread
in the namespace and runs callables there (opening a tap, creating an AF_PACKET socket: both stay
in the namespace they were made in, whichever thread uses their fds afterwards). Needs root and
iproute2; :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vmmkit_devices.virtio.tap import Tap

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
#: IEEE 802 local experimental ethertype 1, so no host stack frame is mistaken for ours.
ETH_P_TEST = 0x88B5

T = TypeVar("T")


def unavailable_reason() -> str | None:
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class Netns:
    """``ip netns add <name>`` plus a thread inside it; :meth:`close` removes both."""

    def __init__(self, name: str) -> None:
        self.name = name
        ip("netns", "add", name)
        self._work: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]] | None] = queue.Queue()
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(ready,), name=f"netns-{name}", daemon=True)
        self._thread.start()
        error = ready.get(timeout=10)
        if error is not None:
            self.close()
            raise error
        # No IPv6 chatter (router solicitations, MLD) on the interfaces of this namespace.
        self.run(lambda: subprocess.run(
            ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
            capture_output=True, timeout=10))

    def _main(self, ready: queue.Queue[BaseException | None]) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns: {os.strerror(error)}")
            finally:
                os.close(fd)
        except BaseException as exc:
            ready.put(exc)
            return
        ready.put(None)
        while (item := self._work.get()) is not None:
            job, reply = item
            try:
                reply.put((True, job()))
            except BaseException as exc:
                reply.put((False, exc))

    def run(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the thread inside the namespace; its result or its exception."""
        reply: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._work.put((job, reply))
        ok, value = reply.get(timeout=30)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def ip(self, *args: str) -> str:
        return ip("-n", self.name, *args)

    def close(self) -> None:
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join(10)
        try:
            ip("netns", "del", self.name)
        except RuntimeError:
            pass


def packet_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` (call it inside the namespace)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    sock.settimeout(5)
    return sock


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_P_TEST) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def receive_test_frame(sock: socket.socket, payload_prefix: bytes = b"") -> bytes:
    """The next incoming frame of our ethertype (whose payload starts with ``payload_prefix``)."""
    while True:
        data, address = sock.recvfrom(65536)
        if address[2] == PACKET_OUTGOING or len(data) < 14:
            continue
        if struct.unpack("!H", data[12:14])[0] == ETH_P_TEST and data[14:].startswith(payload_prefix):
            return data


class FakeTap(Tap):
    """A datagram socketpair standing in for a tap (no root needed): one write, one frame,
    the 12-byte vnet header included both ways. ``peer`` is the host side. ``offloads`` are the
    ``TUN_F_*`` bits it claims to take; :meth:`set_offload` records what the device set."""

    def __init__(self, offloads: int = 0) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        super().__init__(ours.detach(), "fake0")
        self.offloads = offloads
        self.offload_set: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.offload_set.append(flags)

    def close(self) -> None:
        super().close()
        self.peer.close()
