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
    pages = {
        pml4: struct.pack("<Q", pdpt | PRESENT | WRITABLE).ljust(4096, b"\0"),
        pdpt: b"".join(
            struct.pack("<Q", pd + 4096 * i | PRESENT | WRITABLE) for i in range(MAPPED_GIB)
        ).ljust(4096, b"\0"),
    }
    for gib in range(MAPPED_GIB):
        pages[pd + 4096 * gib] = b"".join(
            struct.pack("<Q", ((gib << 30) + (j << 21)) | PRESENT | WRITABLE | PAGE_SIZE_2M)
            for j in range(512)
        )
    return pages
