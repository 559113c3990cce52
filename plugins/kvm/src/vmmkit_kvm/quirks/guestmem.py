"""Reading guest memory the way a vCPU sees it: physical reads through the VM's memory slots,
and virtual reads through the guest's own x86-64 page tables (4- or 5-level, 1 GiB and 2 MiB
pages).

Everything read here is guest-controlled: addresses outside every slot, absent pages and
page-table loops simply give ``None``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

PAGE = 0x1000
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
PTE_PRESENT = 1 << 0
PTE_LARGE = 1 << 7
CR0_PG = 1 << 31
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10

#: ``(guest_addr, size, host_addr)`` of each memory slot.
Slot = tuple[int, int, int]


class GuestPhysical:
    """Reads guest-physical memory from the host mappings of the VM's memory slots."""

    def __init__(self, slots: Callable[[], Iterable[Slot]]) -> None:
        self._slots = slots

    def read(self, addr: int, size: int) -> bytes | None:
        """``size`` bytes at ``addr``, or ``None`` if they are not all in one slot."""
        if size < 0 or addr < 0:
            return None
        for guest, length, host in self._slots():
            if guest <= addr and addr + size <= guest + length:
                from vmmkit_kvm._native import ffi

                return bytes(ffi.buffer(ffi.cast("char *", host + addr - guest), size))
        return None

    def u64(self, addr: int) -> int | None:
        data = self.read(addr, 8)
        return None if data is None else int(struct.unpack("<Q", data)[0])


class GuestVirtual:
    """Virtual reads through the page tables rooted at ``cr3`` (long mode only)."""

    def __init__(self, memory: GuestPhysical, cr3: int, cr4: int) -> None:
        self.memory = memory
        self.root = cr3 & ADDRESS_MASK
        self.levels = 5 if cr4 & CR4_LA57 else 4

    def translate(self, vaddr: int) -> int | None:
        """The physical address of ``vaddr``, or ``None`` if it is not mapped."""
        table = self.root
        for level in range(self.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            entry = self.memory.u64(table + ((vaddr >> shift) & 0x1FF) * 8)
            if entry is None or not entry & PTE_PRESENT:
                return None
            if level in (2, 3) and entry & PTE_LARGE:
                span = 1 << shift
                return (entry & ADDRESS_MASK & ~(span - 1)) | (vaddr & (span - 1))
            table = entry & ADDRESS_MASK
        return table | (vaddr & (PAGE - 1))

    def read(self, vaddr: int, size: int) -> bytes | None:
        """``size`` bytes at ``vaddr`` (across pages), or ``None`` if any is unmapped."""
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE - (vaddr & (PAGE - 1)))
            phys = self.translate(vaddr)
            data = None if phys is None else self.memory.read(phys, chunk)
            if data is None:
                return None
            out += data
            vaddr = (vaddr + chunk) & 0xFFFF_FFFF_FFFF_FFFF
            size -= chunk
        return bytes(out)

    def u64s(self, vaddr: int, count: int) -> tuple[int, ...] | None:
        data = self.read(vaddr, 8 * count)
        return None if data is None else struct.unpack(f"<{count}Q", data)


def idt_gate_target(idt: bytes, vector: int) -> int | None:
    """The handler address of a 64-bit IDT gate (16 bytes per vector), if the gate is present."""
    entry = idt[16 * vector : 16 * vector + 16]
    if len(entry) < 16:
        return None
    low, _selector, _ist, attributes, middle, high = (int(f) for f in struct.unpack_from("<HHBBHI", entry))
    if not attributes & 0x80:
        return None
    return low | middle << 16 | high << 32
