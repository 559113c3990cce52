"""The vhost-user wire protocol: message codes, flag and feature bits, payload layouts, and a
``send``/``recv`` pair over a Unix stream socket that carries file descriptors (SCM_RIGHTS).

Every number is from QEMU's ``docs/interop/vhost-user.rst`` ("Message types", "Protocol
features") and cross-checked against rust-vmm's ``vhost/src/vhost_user/message.rs``. All
integers are in the host's byte order (the spec: "machine native byte order").

A peer's message is hostile input: :func:`recv` checks the version, the reserved flag bits, the
request code, the payload size and the number of descriptors, and the ``unpack`` functions check
exact payload lengths; any violation raises :class:`VhostUserProtocolError` (and closes the
descriptors that came with the message).
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from vmmkit.errors import VmmError

_T = TypeVar("_T")


class VhostUserProtocolError(VmmError):
    """A vhost-user peer sent something the protocol does not allow, or hung up."""


class VhostUserDisconnected(VhostUserProtocolError):
    """The peer closed the connection (end of file where a message was due)."""


class FrontendRequest(enum.IntEnum):
    """Front-end message types (requests the front-end sends to the back-end)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end message types (sent on the back-end request channel, ``SET_BACKEND_REQ_FD``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (``GET_PROTOCOL_FEATURES`` / ``SET_PROTOCOL_FEATURES``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def protocol_mask(*features: ProtocolFeature) -> int:
    """The protocol feature bit mask of ``features``."""
    mask = 0
    for feature in features:
        mask |= 1 << feature
    return mask


# Header flags: bits 0-1 the version (1), bit 2 a reply, bit 3 "reply with an ack"; the rest
# reserved (zero).
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
RESERVED_FLAGS_MASK = ~0xF & 0xFFFF_FFFF

# Virtio feature bits vhost-user adds to the device's (GET_FEATURES / SET_FEATURES).
F_LOG_ALL = 26
F_PROTOCOL_FEATURES = 30

# The u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 the queue index, bit 8 "no descriptor".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# VHOST_MEMORY_BASELINE_NREGIONS: the most regions (and so descriptors) SET_MEM_TABLE carries,
# and the most descriptors any message may carry.
MAX_MEM_REGIONS = 8
MAX_FDS = 8
# The largest payload accepted (rust-vmm's MAX_MSG_SIZE): the variable-size messages
# (memory table, config space) fit well inside it.
MAX_PAYLOAD = 0x1000
# GET_CONFIG / SET_CONFIG flags.
CONFIG_FLAG_WRITABLE = 0x1
CONFIG_FLAG_LIVE_MIGRATION = 0x2

HEADER = struct.Struct("=III")  # request, flags, size
HEADER_SIZE = HEADER.size

_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")
_VRING_ADDRESS = struct.Struct("=IIQQQQ")
_MEMORY_TABLE_HEAD = struct.Struct("=II")  # nregions, padding
_MEMORY_REGION = struct.Struct("=QQQQ")
_CONFIG_HEAD = struct.Struct("=III")  # offset, size, flags
_INFLIGHT = struct.Struct("=QQHH4x")  # repr(C): padded to 24 bytes, as QEMU and rust-vmm send it
_LOG = struct.Struct("=QQ")


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int


def pack_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def unpack_header(data: bytes) -> Header:
    if len(data) != HEADER_SIZE:
        raise VhostUserProtocolError(f"header of {len(data)} bytes, expected {HEADER_SIZE}")
    return Header(*HEADER.unpack(data))


@dataclass(frozen=True)
class Message:
    """One message: ``request`` is a :class:`FrontendRequest` or :class:`BackendRequest` code."""

    request: int
    payload: bytes = b""
    flags: int = VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def reply(self, payload: bytes = b"") -> Message:
        """The reply to this request (same code, the REPLY flag)."""
        return Message(self.request, payload, VERSION | FLAG_REPLY)

    def encode(self) -> bytes:
        return pack_header(self.request, self.flags, len(self.payload)) + self.payload


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise VhostUserProtocolError(f"{what} payload of {len(data)} bytes, expected {size}")


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(data: bytes) -> int:
    _exact(data, _U64.size, "u64")
    value: int = _U64.unpack(data)[0]
    return value


def pack_vring_file(index: int, *, no_fd: bool = False) -> bytes:
    """The u64 of SET_VRING_KICK/CALL/ERR: the queue index, bit 8 when no descriptor comes."""
    if not 0 <= index <= VRING_INDEX_MASK:
        raise VhostUserProtocolError(f"vring index {index} out of range 0..{VRING_INDEX_MASK}")
    return pack_u64(index | (VRING_NOFD_MASK if no_fd else 0))


def unpack_vring_file(data: bytes) -> tuple[int, bool]:
    """(queue index, no descriptor) of a SET_VRING_KICK/CALL/ERR payload."""
    value = unpack_u64(data)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise VhostUserProtocolError(f"vring file payload {value:#x} has reserved bits set")
    return value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK)


@dataclass(frozen=True)
class VringState:
    """SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE."""

    index: int
    num: int

    def pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        _exact(data, _VRING_STATE.size, "vring state")
        return cls(*_VRING_STATE.unpack(data))


@dataclass(frozen=True)
class VringAddress:
    """SET_VRING_ADDR: the rings' addresses in the front-end's (vmmkit's) address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0

    SIZE = _VRING_ADDRESS.size

    def pack(self) -> bytes:
        return _VRING_ADDRESS.pack(
            self.index, self.flags, self.desc_user_addr, self.used_user_addr,
            self.avail_user_addr, self.log_guest_addr,
        )

    @classmethod
    def unpack(cls, data: bytes) -> VringAddress:
        _exact(data, _VRING_ADDRESS.size, "vring address")
        return cls(*_VRING_ADDRESS.unpack(data))


@dataclass(frozen=True)
class MemoryRegion:
    """One region of the memory table: its descriptor travels alongside, in order."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int = 0

    SIZE = _MEMORY_REGION.size

    def pack(self) -> bytes:
        return _MEMORY_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryRegion:
        _exact(data, _MEMORY_REGION.size, "memory region")
        region = cls(*_MEMORY_REGION.unpack(data))
        if region.memory_size == 0:
            raise VhostUserProtocolError("memory region of size 0")
        for start in (region.guest_phys_addr, region.userspace_addr, region.mmap_offset):
            if start + region.memory_size > 1 << 64:
                raise VhostUserProtocolError(f"memory region {region} wraps the address space")
        return region


def pack_memory_table(regions: Sequence[MemoryRegion]) -> bytes:
    """SET_MEM_TABLE's payload (``nregions``, padding, the regions); at most 8 regions."""
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise VhostUserProtocolError(f"a memory table holds 1..{MAX_MEM_REGIONS} regions, not {len(regions)}")
    return _MEMORY_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_memory_table(data: bytes) -> list[MemoryRegion]:
    if len(data) < _MEMORY_TABLE_HEAD.size:
        raise VhostUserProtocolError(f"memory table payload of {len(data)} bytes is too short")
    count, _padding = _MEMORY_TABLE_HEAD.unpack_from(data)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise VhostUserProtocolError(f"memory table of {count} regions (1..{MAX_MEM_REGIONS} allowed)")
    body = data[_MEMORY_TABLE_HEAD.size:]
    # QEMU sends the whole fixed-size array (8 regions) whatever the count; rust-vmm exactly
    # ``count``: both are accepted, nothing else.
    if len(body) not in (count * MemoryRegion.SIZE, MAX_MEM_REGIONS * MemoryRegion.SIZE):
        raise VhostUserProtocolError(f"memory table of {count} regions in {len(data)} bytes")
    size = MemoryRegion.SIZE
    return [MemoryRegion.unpack(body[i * size:(i + 1) * size]) for i in range(count)]


def pack_single_region(region: MemoryRegion) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG's payload: 8 bytes of padding, then the region."""
    return _U64.pack(0) + region.pack()


def unpack_single_region(data: bytes) -> MemoryRegion:
    _exact(data, _U64.size + MemoryRegion.SIZE, "single memory region")
    return MemoryRegion.unpack(data[_U64.size:])


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: ``size`` bytes of the device config space at ``offset``."""

    offset: int
    size: int
    flags: int
    payload: bytes

    MAX_SIZE = MAX_PAYLOAD - _CONFIG_HEAD.size

    def pack(self) -> bytes:
        if len(self.payload) != self.size:
            raise VhostUserProtocolError(f"config payload of {len(self.payload)} bytes, size says {self.size}")
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        if len(data) < _CONFIG_HEAD.size:
            raise VhostUserProtocolError(f"config payload of {len(data)} bytes is too short")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        payload = data[_CONFIG_HEAD.size:]
        if size != len(payload) or size > cls.MAX_SIZE:
            raise VhostUserProtocolError(f"config message says {size} bytes and carries {len(payload)}")
        if offset + size > cls.MAX_SIZE:
            raise VhostUserProtocolError(f"config range {offset}+{size} out of the config space")
        if flags & ~(CONFIG_FLAG_WRITABLE | CONFIG_FLAG_LIVE_MIGRATION):
            raise VhostUserProtocolError(f"config flags {flags:#x} has unknown bits")
        return cls(offset, size, flags, payload)


@dataclass(frozen=True)
class Inflight:
    """GET_INFLIGHT_FD / SET_INFLIGHT_FD: the shared buffer that tracks in-flight requests."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    SIZE = _INFLIGHT.size

    def pack(self) -> bytes:
        return _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        _exact(data, _INFLIGHT.size, "inflight")
        return cls(*_INFLIGHT.unpack(data))


@dataclass(frozen=True)
class Log:
    """SET_LOG_BASE: the dirty log's size and offset in the descriptor."""

    mmap_size: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Log:
        _exact(data, _LOG.size, "log")
        return cls(*_LOG.unpack(data))


# ---- the socket -------------------------------------------------------------------------------


def send(sock: socket.socket, msg: Message, fds: Sequence[int] = ()) -> None:
    """Send ``msg`` with ``fds`` attached to its first byte (SCM_RIGHTS); the descriptors stay
    the caller's to close."""
    if len(fds) > MAX_FDS:
        raise VhostUserProtocolError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
    if len(msg.payload) > MAX_PAYLOAD:
        raise VhostUserProtocolError(f"payload of {len(msg.payload)} bytes (at most {MAX_PAYLOAD})")
    data = memoryview(msg.encode())
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        sent = sock.sendmsg([data], ancillary)
        while sent < len(data):
            sent += sock.send(data[sent:])
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise VhostUserDisconnected(f"vhost-user peer hung up: {exc.strerror}") from None


def recv(
    sock: socket.socket, requests: type[enum.IntEnum] = FrontendRequest
) -> tuple[Message, list[int]]:
    """Receive one message whose code must be one of ``requests``; the caller owns (and must
    close) the returned descriptors.

    :raises VhostUserDisconnected: end of file before a whole message.
    :raises VhostUserProtocolError: a malformed message (its descriptors are closed).
    """
    fds: list[int] = []
    try:
        header_bytes, fds = _recv_header(sock)
        header = unpack_header(header_bytes)
        if header.flags & VERSION_MASK != VERSION:
            raise VhostUserProtocolError(f"message version {header.flags & VERSION_MASK}, expected {VERSION}")
        if header.flags & RESERVED_FLAGS_MASK:
            raise VhostUserProtocolError(f"message flags {header.flags:#x} have reserved bits set")
        try:
            requests(header.request)
        except ValueError:
            raise VhostUserProtocolError(f"unknown {requests.__name__} code {header.request}") from None
        if header.size > MAX_PAYLOAD:
            raise VhostUserProtocolError(f"payload of {header.size} bytes (at most {MAX_PAYLOAD})")
        payload = _recv_exact(sock, header.size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(header.request, payload, header.flags), fds


def _recv_header(sock: socket.socket) -> tuple[bytes, list[int]]:
    fd_size = array.array("i").itemsize
    data, ancdata, msg_flags, _addr = _retry(
        lambda: sock.recvmsg(HEADER_SIZE, socket.CMSG_SPACE((MAX_FDS + 1) * fd_size))
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fds.extend(received)
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise VhostUserProtocolError("message carried more descriptors than the protocol allows")
        if len(fds) > MAX_FDS:
            raise VhostUserProtocolError(f"message carried {len(fds)} descriptors (at most {MAX_FDS})")
        if not data:
            raise VhostUserDisconnected("vhost-user peer closed the connection")
        if len(data) < HEADER_SIZE:
            data += _recv_exact(sock, HEADER_SIZE - len(data))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, fds


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        try:
            count = sock.recv_into(view[got:], size - got)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise VhostUserDisconnected(f"vhost-user peer hung up: {exc.strerror}") from None
        if count == 0:
            raise VhostUserDisconnected(f"vhost-user peer closed the connection mid-message ({got} of {size} bytes)")
        got += count
    return bytes(buffer)


def _retry(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise VhostUserDisconnected(f"vhost-user peer hung up: {exc.strerror}") from None
