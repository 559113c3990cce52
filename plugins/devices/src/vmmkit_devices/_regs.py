"""A base for devices made of 8-bit registers, with the guest-facing checks in one place.

The guest chooses ``offset`` and ``size`` of every access. :class:`ByteRegisters` turns a wide
access into byte accesses at consecutive offsets (as QEMU does for byte-only devices: an
``outw`` to 0x70 writes the index to 0x70 and the data to 0x71), answers ``0xff`` for bytes
outside the device's range, and never lets an exception reach the vCPU loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from vmmkit.device import Device
from vmmkit.log import get_logger

log = get_logger()

#: Widest CPU access a bus delivers (``size`` / ``len(data)`` are 1, 2, 4 or 8).
MAX_ACCESS = 8


def open_bus(size: int) -> bytes:
    """What a read of nothing returns: all ones, ``size`` bytes (clamped to 0..8)."""
    return b"\xff" * min(max(size, 0), MAX_ACCESS)


class ByteRegisters(Device):
    """A device whose registers are single bytes at offsets ``0 .. length - 1``.

    Subclasses implement :meth:`read_byte` and :meth:`write_byte`; those see only offsets
    inside the range. ``errors`` counts accesses that raised (a bug, logged once per device):
    they read as ``0xff`` and are otherwise ignored.
    """

    #: Bytes of port or MMIO space the device decodes.
    length: ClassVar[int] = 1

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.errors = 0

    def read_byte(self, offset: int) -> int:
        """The register at ``offset`` (``0 <= offset < length``)."""
        return 0xFF

    def write_byte(self, offset: int, value: int) -> None:
        """Store ``value`` (0..255) to the register at ``offset``."""

    def read(self, offset: int, size: int) -> bytes:
        if not 1 <= size <= MAX_ACCESS or not 0 <= offset < self.length:
            return open_bus(size)
        try:
            out = bytearray(b"\xff" * size)
            for index in range(size):
                if offset + index < self.length:
                    out[index] = self.read_byte(offset + index) & 0xFF
            return bytes(out)
        except Exception:
            self._failed("read", offset)
            return open_bus(size)

    def write(self, offset: int, data: bytes) -> None:
        if not 1 <= len(data) <= MAX_ACCESS or not 0 <= offset < self.length:
            return
        try:
            for index, value in enumerate(bytes(data)):
                if offset + index < self.length:
                    self.write_byte(offset + index, value)
        except Exception:
            self._failed("write", offset)

    def _failed(self, access: str, offset: int) -> None:
        self.errors += 1
        if self.errors == 1:
            log.exception("device.access_failed", device=self.id, access=access, offset=offset)

    def counters(self) -> Mapping[str, int]:
        return {"errors": self.errors} if self.errors else {}
