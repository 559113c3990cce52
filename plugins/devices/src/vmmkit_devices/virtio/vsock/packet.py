"""virtio-vsock packet headers (virtio 1.2, section 5.10.6): ``struct virtio_vsock_hdr``,
44 bytes little-endian, and the checks every header from the guest passes before the muxer
acts on it.

Every field a guest writes is hostile: :func:`check_guest_header` returns why a header cannot
be honoured (the muxer then answers RST, or drops a packet it must not answer), never raises.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

#: struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
#: buf_alloc, fwd_cnt.
HEADER: Final = struct.Struct("<QQIIIHHIII")
HEADER_SIZE: Final = HEADER.size  # 44

#: The host's CID (VMADDR_CID_HOST); the guest's is in the device's configuration space.
HOST_CID: Final = 2
#: The largest payload of one packet: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE (64 KiB), also
#: Cloud Hypervisor's ``MAX_PKT_BUF_SIZE``.
MAX_PAYLOAD: Final = 64 * 1024

#: virtio_vsock_type: only stream sockets (no VIRTIO_VSOCK_F_SEQPACKET offered).
TYPE_STREAM: Final = 1

SHUTDOWN_RCV: Final = 1
SHUTDOWN_SEND: Final = 2
SHUTDOWN_BOTH: Final = SHUTDOWN_RCV | SHUTDOWN_SEND

U32: Final = 0xFFFF_FFFF


class Op(enum.IntEnum):
    """virtio_vsock_op."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


_OPS: Final = frozenset(int(op) for op in Op)


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(*self)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """The header at the start of ``data`` (at least :data:`HEADER_SIZE` bytes)."""
        return cls(*HEADER.unpack_from(data))

    def reply(self, op: Op, *, buf_alloc: int = 0, fwd_cnt: int = 0) -> Header:
        """A packet from the host back to this packet's sender (the guest), without payload;
        from the host's CID whatever CID the guest addressed."""
        return Header(HOST_CID, self.src_cid, self.dst_port, self.src_port, 0, TYPE_STREAM, op, 0,
                      buf_alloc, fwd_cnt)


def check_guest_header(header: Header, payload_available: int, guest_cid: int) -> tuple[str, bool] | None:
    """Why the guest's ``header`` cannot be honoured, ``None`` when it can.

    :param payload_available: the device-readable bytes of the chain after the header.
    :param guest_cid: the device's CID.
    :returns: ``(reason, answer_rst)``: a packet with a spoofed source is dropped silently
        (``False``: answering would talk to someone else), everything else is refused with an RST
        (unless it is an RST itself).
    """
    if header.src_cid != guest_cid:
        return f"source CID {header.src_cid} is not the guest's {guest_cid}", False
    if header.op == Op.RST:
        return None
    if header.dst_cid != HOST_CID:
        return f"destination CID {header.dst_cid} is not the host ({HOST_CID})", True
    if header.type != TYPE_STREAM:
        return f"socket type {header.type} (only stream sockets, type {TYPE_STREAM})", True
    if header.op not in _OPS:
        return f"unknown operation {header.op}", True
    if header.op == Op.RW:
        if header.len > MAX_PAYLOAD:
            return f"payload length {header.len} is over {MAX_PAYLOAD}", True
        if header.len > payload_available:
            return f"payload length {header.len} but the buffer holds {payload_available} bytes", True
    elif header.len != 0:
        return f"a {Op(header.op).name} packet with {header.len} payload bytes", True
    return None
