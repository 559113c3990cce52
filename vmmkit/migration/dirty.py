"""What pre-copy must send again: the backend's dirty log, and content digests for the
writes no dirty log sees.

Guest RAM is tracked in blocks of :data:`BLOCK` bytes. Two sources make a block dirty:

- the backend's log of *guest* writes (:meth:`vmmkit.hypervisor.Vm.get_dirty_log`: KVM's
  ``KVM_GET_DIRTY_LOG``, MSHV's GPA access bitmap, ``emu``'s write hooks), one bit per page;
- writes the VMM process makes itself (virtio devices filling buffers and used rings, in Python
  or in C on their queue threads), which no backend log shows: every block sent is recorded
  with a digest of the bytes sent, and the final stop-and-copy, once the devices are paused,
  compares every block's digest with its content and sends the ones that changed.

A block is always sent whole and its digest taken of exactly the bytes sent, so a device
write to one page of a block the guest dirtied elsewhere is never folded into a digest
unsent. Blocks of zeros are not sent in the first pass (the receiver's fresh memory reads as
zeros) but recorded as sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Final

from vmmkit.memory import PAGE_SIZE, GuestRegion

#: Bytes per tracked block (16 pages).
BLOCK: Final = 64 << 10
PAGES_PER_BLOCK: Final = BLOCK // PAGE_SIZE
_ZERO_BLOCK: Final = bytes(BLOCK)


def digest(data: bytes) -> bytes:
    return hashlib.sha1(data, usedforsecurity=False).digest()


_ZERO_DIGEST: Final = digest(_ZERO_BLOCK)


def blocks_in(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def dirty_pages(bitmap: bytes, pages: int) -> Iterator[int]:
    """The pages whose bit is set (bit ``i % 8`` of byte ``i // 8``, the layout of KVM's and
    MSHV's bitmaps); bits past ``pages`` (padding) are ignored."""
    limit = min(len(bitmap), (pages + 7) // 8)
    for word in range(0, limit, 8):
        chunk = bitmap[word : min(word + 8, limit)]
        if not any(chunk):
            continue
        for index, byte in enumerate(chunk, word):
            for bit in range(8):
                page = index * 8 + bit
                if byte >> bit & 1 and page < pages:
                    yield page


def dirty_blocks(bitmap: bytes, size: int) -> set[int]:
    """The blocks of a ``size``-byte slot that hold a page set in ``bitmap``."""
    return {page // PAGES_PER_BLOCK for page in dirty_pages(bitmap, size // PAGE_SIZE)}


def runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ``(first block, count)`` runs of consecutive blocks."""
    out: list[tuple[int, int]] = []
    for block in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == block:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((block, 1))
    return out


class RegionLedger:
    """The digest of what was last sent of each block of one RAM region."""

    def __init__(self, region: GuestRegion) -> None:
        self.region = region
        self.digests: list[bytes | None] = [None] * blocks_in(region.size)

    def extent(self, first: int, count: int) -> tuple[int, int]:
        """``(offset, length)`` of ``count`` blocks from ``first`` (the last may be short)."""
        offset = first * BLOCK
        return offset, min(count * BLOCK, self.region.size - offset)

    def snapshot(self, first: int, count: int) -> bytes:
        """The bytes of the blocks, copied once; their digests recorded as sent."""
        offset, length = self.extent(first, count)
        data = self.region.buffer[offset : offset + length]
        for i in range(count):
            self.digests[first + i] = digest(data[i * BLOCK : (i + 1) * BLOCK])
        return data

    def first_pass(self) -> list[int]:
        """Blocks holding anything but zeros (to send); zero blocks are recorded as sent."""
        nonzero = []
        buffer = self.region.buffer
        for block in range(len(self.digests)):
            offset, length = self.extent(block, 1)
            if buffer[offset : offset + length] == _ZERO_BLOCK[:length]:
                self.digests[block] = _ZERO_DIGEST if length == BLOCK else digest(_ZERO_BLOCK[:length])
            else:
                nonzero.append(block)
        return nonzero

    def changed(self) -> list[int]:
        """Blocks whose content is not what was last sent (or never sent). A block sent as
        zeros and still zeros is recognised by comparison alone (most of a guest's RAM)."""
        buffer = self.region.buffer
        out = []
        for block, sent in enumerate(self.digests):
            offset, length = self.extent(block, 1)
            data = buffer[offset : offset + length]
            if sent is _ZERO_DIGEST and data == _ZERO_BLOCK:
                continue
            if sent is None or digest(data) != sent:
                out.append(block)
        return out
