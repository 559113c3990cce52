"""The boot GDT and the segment registers loaded from it.

Both protocols use the same selectors, those the Linux boot protocol requires
(``__BOOT_CS`` = 0x10, ``__BOOT_DS`` = 0x18)::

    0x00 null   0x08 null   0x10 code (64-bit for linux64, 32-bit for pvh)   0x18 data   0x20 TSS

All segments are flat (base 0, 4 GiB limit).
"""

from __future__ import annotations

import struct
from typing import Final

from vmmkit.x86 import Segment

CODE_SELECTOR: Final = 0x10
DATA_SELECTOR: Final = 0x18
TSS_SELECTOR: Final = 0x20

# Access+flags words as Cloud Hypervisor writes them: (flags << 12) | access byte.
CODE64_FLAGS: Final = 0xA09B  # G, L, present, DPL0, code execute/read accessed
CODE32_FLAGS: Final = 0xC09B  # G, D/B, present, DPL0, code execute/read accessed
DATA_FLAGS: Final = 0xC093  # G, D/B, present, DPL0, data read/write accessed
TSS_FLAGS: Final = 0x808B  # G, present, 32-bit busy TSS


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def gdt_entries(long_mode: bool) -> list[int]:
    return [
        0,
        0,
        gdt_entry(CODE64_FLAGS if long_mode else CODE32_FLAGS, 0, 0xFFFFF),
        gdt_entry(DATA_FLAGS, 0, 0xFFFFF),
        gdt_entry(TSS_FLAGS, 0, 0xFFFFF),
    ]


def gdt_bytes(long_mode: bool) -> bytes:
    return b"".join(struct.pack("<Q", e) for e in gdt_entries(long_mode))


def segment_from_entry(entry: int, selector: int) -> Segment:
    """The hidden segment state a load of ``selector`` (pointing at ``entry``) produces."""
    limit = ((entry >> 32) & 0x000F0000) | (entry & 0x0000FFFF)
    g = (entry >> 55) & 1
    return Segment(
        base=((entry >> 16) & 0x00FFFFFF) | ((entry >> 32) & 0xFF000000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def boot_segments(long_mode: bool) -> tuple[Segment, Segment, Segment]:
    """``(code, data, tss)`` segments for the GDT of :func:`gdt_entries`."""
    entries = gdt_entries(long_mode)
    return (
        segment_from_entry(entries[CODE_SELECTOR // 8], CODE_SELECTOR),
        segment_from_entry(entries[DATA_SELECTOR // 8], DATA_SELECTOR),
        segment_from_entry(entries[TSS_SELECTOR // 8], TSS_SELECTOR),
    )
