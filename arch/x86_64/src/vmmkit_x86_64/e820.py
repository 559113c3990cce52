"""The e820 memory map a guest gets (in the zero page, or as the PVH memory map).

RAM below the EBDA, the EBDA/VGA/BIOS area reserved (it holds the MP and ACPI tables), RAM
from 1 MiB to the 32-bit hole, RAM above 4 GiB, and the PCI ECAM window reserved (Linux
accepts an MCFG area only if the firmware reserves it).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from vmmkit.arch import MemoryLayout
from vmmkit.value import Value
from vmmkit_x86_64 import layout as L

E820_RAM: Final = 1
E820_RESERVED: Final = 2
E820_ACPI: Final = 3
E820_NVS: Final = 4
E820_UNUSABLE: Final = 5

#: boot_params.e820_table holds 128 entries (E820_MAX_ENTRIES_ZEROPAGE).
MAX_ENTRIES: Final = 128


class E820Entry(Value):
    """One memory map entry (a value: compare, hash, never change)."""

    __slots__ = ("addr", "size", "type")

    def __init__(self, addr: int, size: int, type: int) -> None:
        self.addr = addr
        self.size = size
        self.type = type

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        """``struct boot_e820_entry`` (20 bytes, packed)."""
        return struct.pack("<QQI", self.addr, self.size, self.type)

    def pack_pvh(self) -> bytes:
        """``struct hvm_memmap_table_entry`` (24 bytes)."""
        return struct.pack("<QQII", self.addr, self.size, self.type, 0)


def e820_map(layout: MemoryLayout) -> list[E820Entry]:
    low = layout.ram[0]
    if low.start != 0 or low.end < L.HIGH_RAM_START:
        raise ValueError("x86-64 layouts start with RAM from 0 past 1 MiB")
    entries = [
        E820Entry(0, L.EBDA_START, E820_RAM),
        E820Entry(L.EBDA_START, L.HIGH_RAM_START - L.EBDA_START, E820_RESERVED),
    ]
    if low.end > L.HIGH_RAM_START:
        entries.append(E820Entry(L.HIGH_RAM_START, low.end - L.HIGH_RAM_START, E820_RAM))
    entries += [E820Entry(r.start, r.size, E820_RAM) for r in layout.ram[1:]]
    if layout.pci_ecam is not None:
        entries.append(E820Entry(layout.pci_ecam.start, layout.pci_ecam.size, E820_RESERVED))
    entries.sort(key=lambda e: e.addr)
    check(entries)
    return entries


def check(entries: Sequence[E820Entry]) -> None:
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{len(entries)} e820 entries, more than {MAX_ENTRIES}")
    for before, after in zip(entries, entries[1:], strict=False):
        if before.end > after.addr:
            raise ValueError(f"e820 entries overlap: {before} and {after}")
