"""Port-I/O and MMIO buses: address ranges mapped to devices that see ``(offset, bytes)``.

This is the crosvm / Cloud Hypervisor ``BusDevice`` shape: a device never learns the absolute
address it was placed at, nor which hypervisor delivered the access.
"""

from __future__ import annotations

import bisect
import threading
from typing import Protocol, runtime_checkable

from attrs import frozen

from vmmkit.errors import BusError


@runtime_checkable
class BusDevice(Protocol):
    """Something that answers reads and writes inside its own address range.

    ``offset`` is relative to the start of the range the device was inserted at; ``size`` and
    ``len(data)`` are 1, 2, 4 or 8 for CPU accesses. Both are guest-controlled: check them.
    """

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes for a guest read at ``offset``."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset``."""
        ...


@frozen
class BusRange:
    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length

    def overlaps(self, other: BusRange) -> bool:
        return self.base < other.end and other.base < self.end


class Bus:
    """A sorted table of non-overlapping ranges. Lookups are lock-free reads of an immutable
    snapshot; inserts and removals (hotplug, BAR moves) copy the table under a lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._bases: tuple[int, ...] = ()
        self._entries: tuple[tuple[BusRange, BusDevice], ...] = ()

    def insert(self, device: BusDevice, base: int, length: int) -> BusRange:
        if length <= 0:
            raise BusError(f"{self.name} bus: range at {base:#x} has zero length")
        new = BusRange(base, length)
        with self._lock:
            for rng, other in self._entries:
                if rng.overlaps(new):
                    raise BusError(
                        f"{self.name} bus: {base:#x}+{length:#x} overlaps {rng.base:#x}+{rng.length:#x}"
                        f" ({type(other).__name__})"
                    )
            entries = sorted((*self._entries, (new, device)), key=lambda e: e[0].base)
            self._publish(entries)
        return new

    def remove(self, base: int) -> BusDevice:
        with self._lock:
            for index, (rng, device) in enumerate(self._entries):
                if rng.base == base:
                    self._publish([*self._entries[:index], *self._entries[index + 1 :]])
                    return device
        raise BusError(f"{self.name} bus: nothing at {base:#x}")

    def _publish(self, entries: list[tuple[BusRange, BusDevice]]) -> None:
        bases = tuple(rng.base for rng, _ in entries)
        self._entries, self._bases = tuple(entries), bases

    def lookup(self, addr: int) -> tuple[BusRange, BusDevice] | None:
        entries, bases = self._entries, self._bases
        index = bisect.bisect_right(bases, addr) - 1
        if index >= 0:
            rng, device = entries[index]
            if addr < rng.end:
                return rng, device
        return None

    def read(self, addr: int, size: int) -> bytes | None:
        """The device's answer, or ``None`` when nothing claims ``addr``."""
        found = self.lookup(addr)
        if found is None:
            return None
        rng, device = found
        return device.read(addr - rng.base, size)

    def write(self, addr: int, data: bytes) -> bool:
        """Deliver a write; ``False`` when nothing claims ``addr``."""
        found = self.lookup(addr)
        if found is None:
            return False
        rng, device = found
        device.write(addr - rng.base, data)
        return True

    def ranges(self) -> list[tuple[BusRange, BusDevice]]:
        return list(self._entries)
