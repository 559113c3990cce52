"""The PVH boot structures (Xen's ``arch-x86/hvm/start_info.h``, version 1).

``struct hvm_start_info`` at :data:`~vmmkit_x86_64.layout.PVH_INFO_START` (EBX points at it on
entry), the module list (the initramfs, when there is one) and the memory map with e820 types.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from vmmkit_x86_64.e820 import E820Entry

XEN_HVM_START_MAGIC: Final = 0x336EC578
VERSION: Final = 1
START_INFO_SIZE: Final = 56
MODLIST_ENTRY_SIZE: Final = 32
MEMMAP_ENTRY_SIZE: Final = 24


def start_info(
    *,
    nr_modules: int,
    modlist_paddr: int,
    cmdline_paddr: int,
    rsdp_paddr: int,
    memmap_paddr: int,
    memmap_entries: int,
    flags: int = 0,
) -> bytes:
    return struct.pack(
        "<IIIIQQQQII",
        XEN_HVM_START_MAGIC,
        VERSION,
        flags,
        nr_modules,
        modlist_paddr,
        cmdline_paddr,
        rsdp_paddr,
        memmap_paddr,
        memmap_entries,
        0,
    )


def modlist_entry(paddr: int, size: int, cmdline_paddr: int = 0) -> bytes:
    return struct.pack("<QQQQ", paddr, size, cmdline_paddr, 0)


def memmap(entries: Sequence[E820Entry]) -> bytes:
    return b"".join(e.pack_pvh() for e in entries)
