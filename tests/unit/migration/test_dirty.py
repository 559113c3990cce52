"""Which RAM pre-copy sends again (vmmkit.migration.dirty): bitmaps, runs, and the digests
that catch writes no dirty log sees."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmmkit.memory import PAGE_SIZE, GuestMemory, GuestRegion, MemoryRange
from vmmkit.migration.dirty import BLOCK, PAGES_PER_BLOCK, RegionLedger, dirty_blocks, dirty_pages, runs


@pytest.fixture
def region() -> Iterator[GuestRegion]:
    memory = GuestMemory.allocate([MemoryRange(0x100000, 8 * BLOCK + 3 * PAGE_SIZE)])  # a short last block
    yield memory.regions[0]
    memory.close()


def bitmap_of(pages: set[int], size: int) -> bytes:
    bits = bytearray((size + 63) // 64 * 8)  # KVM pads to 64-bit words
    for page in pages:
        bits[page // 8] |= 1 << page % 8
    return bytes(bits)


def test_pages_from_a_kvm_style_bitmap() -> None:
    pages = {0, 7, 8, 63, 64, 200, 1023}
    assert list(dirty_pages(bitmap_of(pages, 1024), 1024)) == sorted(pages)
    assert list(dirty_pages(bitmap_of({5, 1023}, 1024), 1000)) == [5]  # padding bits are ignored
    assert list(dirty_pages(bytes(128), 1024)) == []


def test_blocks_from_pages() -> None:
    size = 4 * BLOCK
    pages = {1, PAGES_PER_BLOCK - 1, 3 * PAGES_PER_BLOCK}
    assert dirty_blocks(bitmap_of(pages, size // PAGE_SIZE), size) == {0, 3}


def test_runs() -> None:
    assert runs([5, 1, 2, 3, 9, 10, 2]) == [(1, 3), (5, 1), (9, 2)]
    assert runs([]) == []


def test_the_first_pass_skips_zeros_and_the_last_block_may_be_short(region: GuestRegion) -> None:
    ledger = RegionLedger(region)
    assert len(ledger.digests) == 9
    region.buffer[BLOCK * 2 + 5] = 1
    region.buffer[region.size - 1] = 2
    assert ledger.first_pass() == [2, 8]
    assert ledger.extent(8, 1) == (8 * BLOCK, 3 * PAGE_SIZE)
    assert ledger.changed() == [2, 8]  # not sent yet
    data = ledger.snapshot(2, 1) + ledger.snapshot(8, 1)
    assert len(data) == BLOCK + 3 * PAGE_SIZE
    assert ledger.changed() == []


def test_a_write_after_the_copy_is_found_whoever_made_it(region: GuestRegion) -> None:
    ledger = RegionLedger(region)
    ledger.first_pass()
    region.buffer[7 * BLOCK + 100] = 9  # a zero block written (device DMA: no dirty log sees it)
    region.buffer[0] = 1
    assert ledger.changed() == [0, 7]
    ledger.snapshot(0, 1)
    ledger.snapshot(7, 1)
    region.buffer[7 * BLOCK + 100] = 0  # back to zeros: differs from what was sent
    assert ledger.changed() == [7]


def test_a_block_is_recorded_as_the_bytes_sent(region: GuestRegion) -> None:
    ledger = RegionLedger(region)
    region.buffer[0] = 1
    sent = ledger.snapshot(0, 1)
    region.buffer[PAGE_SIZE] = 3  # another page of the same block, after the copy
    assert sent[PAGE_SIZE] == 0
    assert ledger.changed()[:1] == [0]
