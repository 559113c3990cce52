"""Identity-mapped page tables for the 64-bit entry: the first 4 GiB in 2 MiB pages.

One PML4 page, one PDPT page with four entries, four page directories (0xb000-0xefff). The
whole 32-bit space is mapped so a guest can touch the local APIC and IOAPIC at once.
"""

from __future__ import annotations

import struct
from typing import Final

from vmmkit_x86_64 import layout as L

PRESENT: Final = 1 << 0
WRITABLE: Final = 1 << 1
PAGE_SIZE_2M: Final = 1 << 7
MAPPED_GIB: Final = 4


def page_tables(pml4: int = L.PML4_START, pdpt: int = L.PDPT_START, pd: int = L.PD_START) -> dict[int, bytes]:
    """``{guest address: page}`` for the PML4, the PDPT and the page directories."""
    flags = PRESENT | WRITABLE
    directories = [(pd + 4096 * i) | flags for i in range(MAPPED_GIB)]
    pages = {
        pml4: struct.pack("<Q", pdpt | flags).ljust(4096, b"\0"),
        pdpt: struct.pack(f"<{MAPPED_GIB}Q", *directories).ljust(4096, b"\0"),
    }
    for gib in range(MAPPED_GIB):
        first = (gib << 30) | flags | PAGE_SIZE_2M  # 2 MiB pages: the flags sit in bits the address leaves 0
        pages[pd + 4096 * gib] = struct.pack("<512Q", *range(first, first + (512 << 21), 1 << 21))
    return pages
