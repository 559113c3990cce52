"""A small vhost-user-blk frontend for the tests: one memfd as guest memory, one ring, virtio-blk
chains of three descriptors (header, data, status) written into it, the core's codec for the
messages. Not vmmkit's frontend: the tests judge the backend with the bytes they put on the ring."""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from vmmkit.vhost_user import protocol as vu
from vmmkit.vhost_user.protocol import FrontendRequest as Req

MEM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000
QSIZE = 16
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000
HEADERS, STATUS, DATA = 0x3000, 0x4000, 0x10000
DATA_SLOT = 0x4000
F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
PF = vu.ProtocolFeature
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
DESC_NEXT, DESC_WRITE = 1, 2


class BlkFrontend:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(10)
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = mmap.mmap(self.memfd, MEM_SIZE)
        self.kick = os.eventfd(0)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0

    def close(self) -> None:
        if self.mem.closed:
            return
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, self.kick, self.call, self.err):
            os.close(fd)

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

    def handshake(self, *, inflight: bool = False, features: int = 0) -> int:
        """Negotiate; the device features offered."""
        offered = vu.unpack_u64(self.get(Req.GET_FEATURES))
        protocol = vu.unpack_u64(self.get(Req.GET_PROTOCOL_FEATURES))
        wanted = vu.protocol_mask(PF.REPLY_ACK, PF.CONFIG) | (vu.protocol_mask(PF.INFLIGHT_SHMFD) if inflight else 0)
        assert protocol & wanted == wanted
        vu.send(self.sock, vu.Message(Req.SET_PROTOCOL_FEATURES, vu.pack_u64(wanted)))
        assert self.acked(Req.SET_OWNER) == 0
        acked = VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES | (features & offered)
        assert self.acked(Req.SET_FEATURES, vu.pack_u64(acked)) == 0
        region = vu.MemoryRegion(0, MEM_SIZE, UVA, 0)
        assert self.acked(Req.SET_MEM_TABLE, vu.pack_memory_table([region]), [self.memfd]) == 0
        return offered

    def get_inflight(self) -> tuple[vu.Inflight, int]:
        answer, fds = self.request(Req.GET_INFLIGHT_FD, vu.Inflight(0, 0, 1, QSIZE).pack(), reply=True)
        assert len(fds) == 1
        return vu.Inflight.unpack(answer.payload), fds[0]

    def set_inflight(self, info: vu.Inflight, fd: int) -> int:
        return self.acked(Req.SET_INFLIGHT_FD, info.pack(), [fd])

    def start_ring(self, base: int = 0) -> int:
        return max(
            self.acked(Req.SET_VRING_NUM, vu.VringState(0, QSIZE).pack()),
            self.acked(Req.SET_VRING_ADDR, vu.VringAddress(0, 0, UVA + DESC, UVA + USED, UVA + AVAIL).pack()),
            self.acked(Req.SET_VRING_BASE, vu.VringState(0, base).pack()),
            self.acked(Req.SET_VRING_CALL, vu.pack_vring_file(0), [self.call]),
            self.acked(Req.SET_VRING_ERR, vu.pack_vring_file(0), [self.err]),
            self.acked(Req.SET_VRING_KICK, vu.pack_vring_file(0), [self.kick]),
            self.acked(Req.SET_VRING_ENABLE, vu.VringState(0, 1).pack()),
        )

    # -- chains -------------------------------------------------------------------------------

    def chain(self, slot: int, kind: int, sector: int, length: int, *, data: bytes = b"") -> int:
        """Write request ``slot``'s chain (descriptors 3*slot..): header, ``length`` bytes of data
        (``data`` for a write), status byte 0xff. Its head."""
        head = 3 * slot
        header, status, buffer = HEADERS + 16 * slot, STATUS + slot, DATA + DATA_SLOT * slot
        struct.pack_into("<IIQ", self.mem, header, kind, 0, sector)
        self.mem[buffer:buffer + len(data)] = data
        self.mem[status] = 0xFF
        writes = kind in (T_IN, T_GET_ID)
        descs = [(header, 16, DESC_NEXT, head + 1)]
        if length:
            descs.append((buffer, length, DESC_NEXT | (DESC_WRITE if writes else 0), head + 2))
        descs.append((status, 1, DESC_WRITE, 0))
        for i, (address, size, flags, nxt) in enumerate(descs):
            struct.pack_into("<QIHH", self.mem, DESC + 16 * (head + i), address, size, flags, nxt)
        return head

    def raw_desc(self, index: int, address: int, length: int, flags: int, nxt: int) -> None:
        struct.pack_into("<QIHH", self.mem, DESC + 16 * index, address, length, flags, nxt)

    def make_available(self, head: int, *, kick: bool = True) -> None:
        struct.pack_into("<H", self.mem, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, AVAIL + 2, self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        value: int = struct.unpack_from("<H", self.mem, USED + 2)[0]
        return value

    def used(self, position: int) -> tuple[int, int]:
        head, written = struct.unpack_from("<II", self.mem, USED + 4 + 8 * (position % QSIZE))
        return head, written

    def wait_used(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.used_idx() < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"used index {self.used_idx()}, waited for {count}"
            select.select([self.call], [], [], min(remaining, 0.05))

    def status(self, slot: int) -> int:
        return self.mem[STATUS + slot]

    def data(self, slot: int, length: int) -> bytes:
        return bytes(self.mem[DATA + DATA_SLOT * slot:DATA + DATA_SLOT * slot + length])

    def ring_stopped(self) -> bool:
        try:
            return os.eventfd_read(self.err) > 0
        except BlockingIOError:
            return False


class Daemon:
    """``vmmkit-vhost-user blk`` as a process of its own."""

    def __init__(self, socket_path: Path, image: Path, *args: str) -> None:
        self.socket = socket_path
        self.log = socket_path.with_suffix(".log")
        socket_path.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmmkit_vhost_user.cli", "blk", "--socket-path", str(socket_path),
                 "--blk-file", str(image), "-v", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text()
