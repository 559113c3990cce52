"""Shared by the ARM PrimeCell (AMBA) devices: 32-bit registers, the PrimeCell ID block."""

from __future__ import annotations

from typing import Final

#: The PrimeCell ID registers occupy the last 32 bytes of a 4 KiB register block.
ID_OFFSET: Final = 0xFE0
#: CellID0-3: the PrimeCell signature every AMBA device shares.
CELL_ID: Final = (0x0D, 0xF0, 0x05, 0xB1)
REGISTER_BLOCK: Final = 0x1000


def id_register(offset: int, periph_id: tuple[int, int, int, int]) -> int | None:
    """PeriphID0-3 / CellID0-3 at ``offset`` (0xFE0-0xFFC), else ``None``."""
    if ID_OFFSET <= offset < REGISTER_BLOCK and offset % 4 == 0:
        index = (offset - ID_OFFSET) // 4
        return (periph_id + CELL_ID)[index]
    return None


def split(offset: int, size: int) -> tuple[int, int] | None:
    """``(register, byte shift)`` of an access that stays inside one 32-bit register."""
    if not 1 <= size <= 4 or offset < 0 or offset + size > REGISTER_BLOCK:
        return None
    register = offset & ~3
    if offset + size > register + 4:
        return None
    return register, 8 * (offset - register)


def value_bytes(value: int, shift: int, size: int) -> bytes:
    return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
