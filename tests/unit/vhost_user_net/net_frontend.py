"""A small vhost-user-net frontend for the tests: one memfd as guest memory, receive and transmit
rings written by hand, the core's codec for the messages; and ``vmmkit-vhost-user net`` run inside
a network namespace on a tap there, with an AF_PACKET socket on the tap as the peer. Not vmmkit's
frontend: the tests judge the backend with the bytes they put on the rings and see on the tap."""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req

MEM_SIZE = 4 << 20
UVA = 0x7F00_0000_0000
QSIZE = 16
RING_AREA = 0x4000  #: ring q's descriptor table at q * RING_AREA, available ring +0x1000, used +0x2000
BUFFERS = 0x100000  #: ring q's buffer slot i at BUFFERS + q * 0x40000 + i * SLOT
SLOT = 0x2000
F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_MQ = 1 << 22
PF = vu.ProtocolFeature
DESC_NEXT, DESC_WRITE = 1, 2
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5
PACKET_OUTGOING = 4


class Ring:
    """Ring ``index``'s driver side in the frontend's memory."""

    def __init__(self, front: NetFrontend, index: int) -> None:
        self.front, self.index = front, index
        self.desc = index * RING_AREA
        self.avail, self.used_ring = self.desc + 0x1000, self.desc + 0x2000
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.seen_used = 0

    def slot(self, i: int) -> int:
        return BUFFERS + self.index * 0x40000 + (i % QSIZE) * SLOT

    def start(self, base: int = 0) -> int:
        f, q = self.front, self.index
        return max(
            f.acked(Req.SET_VRING_NUM, vu.VringState(q, QSIZE).pack()),
            f.acked(Req.SET_VRING_ADDR, vu.VringAddress(q, 0, UVA + self.desc, UVA + self.used_ring,
                                                        UVA + self.avail).pack()),
            f.acked(Req.SET_VRING_BASE, vu.VringState(q, base).pack()),
            f.acked(Req.SET_VRING_CALL, vu.pack_vring_file(q), [self.call]),
            f.acked(Req.SET_VRING_ERR, vu.pack_vring_file(q), [self.err]),
            f.acked(Req.SET_VRING_KICK, vu.pack_vring_file(q), [self.kick]),
            f.acked(Req.SET_VRING_ENABLE, vu.VringState(q, 1).pack()),
        )

    def stop(self) -> int:
        answer = self.front.get(Req.GET_VRING_BASE, vu.VringState(self.index, 0).pack())
        return vu.VringState.unpack(answer).num

    def desc_write(self, i: int, address: int, length: int, flags: int, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.front.mem, self.desc + 16 * i, address, length, flags, nxt)

    def post(self, head: int, *, kick: bool = True) -> None:
        mem = self.front.mem
        struct.pack_into("<H", mem, self.avail + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", mem, self.avail + 2, self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def post_buffer(self, i: int, length: int = SLOT, *, kick: bool = True) -> None:
        """A receive buffer: descriptor ``i``, slot ``i``, device-writable."""
        self.desc_write(i, self.slot(i), length, DESC_WRITE)
        self.post(i, kick=kick)

    def send(self, i: int, frame: bytes, header: bytes = bytes(12), *, kick: bool = True) -> None:
        """A transmit chain: descriptor ``i`` (header + frame in slot ``i``)."""
        data = header + frame
        self.front.mem[self.slot(i):self.slot(i) + len(data)] = data
        self.desc_write(i, self.slot(i), len(data), 0)
        self.post(i, kick=kick)

    def used_idx(self) -> int:
        value: int = struct.unpack_from("<H", self.front.mem, self.used_ring + 2)[0]
        return value

    def used(self, position: int) -> tuple[int, int]:
        head, written = struct.unpack_from("<II", self.front.mem, self.used_ring + 4 + 8 * (position % QSIZE))
        return head, written

    def avail_event(self) -> int:
        value: int = struct.unpack_from("<H", self.front.mem, self.used_ring + 4 + 8 * QSIZE)[0]
        return value

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.front.mem, self.avail + 4 + 2 * QSIZE, value)

    def wait_used(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (self.used_idx() - count) & 0xFFFF >= 0x8000:  # until the used index reaches count
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"ring {self.index}: used index {self.used_idx()}, waited for {count}"
            select.select([self.call], [], [], min(remaining, 0.05))

    def take_used(self) -> list[tuple[int, int]]:
        """The used elements since the last call."""
        out = []
        while self.seen_used != self.used_idx():
            out.append(self.used(self.seen_used))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def read_slot(self, i: int, length: int) -> bytes:
        return bytes(self.front.mem[self.slot(i):self.slot(i) + length])

    def called(self) -> bool:
        try:
            return os.eventfd_read(self.call) > 0
        except BlockingIOError:
            return False

    def stopped(self) -> bool:
        try:
            return os.eventfd_read(self.err) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


class NetFrontend:
    def __init__(self, path: Path, rings: int = 2) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.rings = [Ring(self, q) for q in range(rings)]

    @property
    def rx(self) -> Ring:
        return self.rings[0]

    @property
    def tx(self) -> Ring:
        return self.rings[1]

    def close(self) -> None:
        if self.mem.closed:
            return
        self.sock.close()
        self.mem.close()
        os.close(self.memfd)
        for ring in self.rings:
            ring.close()

    def request(self, request: int, payload: bytes = b"", fds: list[int] | None = None, *,
                reply: bool = False) -> tuple[vu.Message, list[int]]:
        vu.send(self.sock, vu.Message(request, payload, vu.VERSION | (0 if reply else vu.FLAG_NEED_REPLY)), fds or [])
        answer, got = vu.recv(self.sock)
        assert answer.is_reply and answer.request == request
        return answer, got

    def acked(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        answer, got = self.request(request, payload, fds)
        assert not got
        return vu.unpack_u64(answer.payload)

    def get(self, request: int, payload: bytes = b"") -> bytes:
        answer, got = self.request(request, payload, reply=True)
        assert not got
        return answer.payload

    def handshake(self, features: int = 0) -> int:
        """Negotiate VERSION_1 and ``features`` (those offered); the device features offered."""
        offered = vu.unpack_u64(self.get(Req.GET_FEATURES))
        protocol = vu.unpack_u64(self.get(Req.GET_PROTOCOL_FEATURES))
        wanted = vu.protocol_mask(PF.REPLY_ACK, PF.MQ)
        assert protocol & wanted == wanted
        vu.send(self.sock, vu.Message(Req.SET_PROTOCOL_FEATURES, vu.pack_u64(wanted)))
        assert self.acked(Req.SET_OWNER) == 0
        acked = VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES | (features & offered)
        assert self.acked(Req.SET_FEATURES, vu.pack_u64(acked)) == 0
        region = vu.MemoryRegion(0, MEM_SIZE, UVA, 0)
        assert self.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([region]), [self.memfd]) == 0
        return offered

    def alive(self) -> bool:
        return bool(vu.unpack_u64(self.get(Req.GET_FEATURES)) & VIRTIO_F_VERSION_1)


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return (dst + src + struct.pack("!H", ETHERTYPE) + payload).ljust(60, b"\0")


class TapPeer:
    """An AF_PACKET socket on the tap (inside the namespace): what it sends reaches the
    backend's receive queues, what the backend transmits arrives here."""

    def __init__(self, sock: socket.socket, tap: str) -> None:
        self.sock = sock
        sock.bind((tap, ETH_P_ALL))
        sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def receive(self, timeout: float = 5, *, match: bytes = struct.pack("!H", ETHERTYPE)) -> bytes:
        """The next frame from the backend with ``match`` at offset 12 (our ethertype)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no frame arrived on the tap"
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                continue
            data, address = self.sock.recvfrom(65536)
            if address[2] != PACKET_OUTGOING and data[12:14] == match:
                return data

    def close(self) -> None:
        self.sock.close()


class NetDaemon:
    """``vmmkit-vhost-user net`` as a process of its own, inside ``prefix`` (``ip netns exec``)."""

    def __init__(self, socket_path: Path, prefix: list[str], *args: str) -> None:
        self.socket = socket_path
        self.log = socket_path.with_suffix(".log")
        socket_path.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "vmmkit_vhost_user.cli", "net", "--socket", str(socket_path),
                 "-v", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text()


def unavailable_reason() -> str | None:
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces and taps need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NetNs:
    """``ip netns add`` with a tap in it; :meth:`close` removes both."""

    def __init__(self, *, multi_queue: bool = False) -> None:
        self.name = f"vunet-{os.getpid()}-{secrets.token_hex(3)}"
        _ip("netns", "add", self.name)
        try:
            mode = ["multi_queue"] if multi_queue else []
            _ip("-n", self.name, "tuntap", "add", "dev", "tap0", "mode", "tap", *mode)
            _ip("-n", self.name, "link", "set", "tap0", "up")
            subprocess.run([*self.prefix, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                           capture_output=True, timeout=10)
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def peer(self, tap: str = "tap0") -> TapPeer:
        """A :class:`TapPeer` whose socket is made inside the namespace (from a short-lived thread:
        ``setns`` moves only the calling thread, the socket stays where it was made)."""
        box: dict[str, object] = {}

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, 0x40000000) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                box["sock"] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        sock = box["sock"]
        assert isinstance(sock, socket.socket)
        return TapPeer(sock, tap)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
