"""Block requests as a guest's virtio-blk driver builds them (header, data, status byte)."""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import pytest
from virtio_driver import Harness
from vmmkit_devices.virtio.block import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)

IN, OUT, FLUSH, GET_ID = VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID
DISCARD, WRITE_ZEROES = VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512


class Reply(NamedTuple):
    status: int
    used: int
    data: bytes


def split(length: int, pieces: int) -> list[int]:
    """``length`` cut into ``pieces`` lengths (the last takes the rest; none empty if possible)."""
    pieces = max(1, min(pieces, length)) if length else 1
    size = length // pieces
    sizes = [size] * (pieces - 1)
    return [*sizes, length - sum(sizes)]


def request(h: Harness, kind: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0, pieces: int = 1,
            queue: int = 0, align: int = 16, indirect: bool = False, wait: bool = True) -> Reply:
    """Submit one request and (by default) wait for it; ``out`` is the data the device reads
    (OUT, DISCARD segments), ``in_len`` the bytes it may write before the status byte."""
    header = struct.pack("<IIQ", kind, 0, sector)
    buffers: list[tuple[int, int, bool]] = [(h.alloc(16, data=header), 16, False)]
    at = 0
    for size in split(len(out), pieces) if out else []:
        buffers.append((h.alloc(size, align, out[at : at + size]), size, False))
        at += size
    ins = []
    for size in split(in_len, pieces) if in_len else []:
        gpa = h.alloc(size, align)
        ins.append((gpa, size))
        buffers.append((gpa, size, True))
    status = h.alloc(1, data=b"\xee")
    buffers.append((status, 1, True))
    table = h.alloc(16 * len(buffers), 16) if indirect else None
    h.submit(queue, buffers, indirect_table=table)
    if not wait:
        return Reply(-1, -1, b"")
    ((_, used),) = h.wait_used(queue)
    data = b"".join(h.memory.read(gpa, size) for gpa, size in ins)
    return Reply(h.memory.read_u8(status), used, data)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def walker_params() -> list[Any]:
    """Both chain walkers: Python's, and the C one where it is built."""
    from vmmkit.virtio import chain

    native = pytest.param(True, id="c-walker", marks=pytest.mark.skipif(
        not chain.native_available(), reason=f"native walker: {chain.NATIVE_UNAVAILABLE_REASON}"))
    return [pytest.param(False, id="py-walker"), native]
