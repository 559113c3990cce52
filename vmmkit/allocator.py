"""Address-space allocation for MMIO windows, PCI BARs and port ranges."""

from __future__ import annotations

import threading

from vmmkit.errors import BusError


class AddressAllocator:
    """First-fit allocation of aligned ranges inside ``[base, base + size)``."""

    def __init__(self, base: int, size: int, name: str = "address space") -> None:
        if size <= 0:
            raise ValueError("allocator needs a non-empty range")
        self.base = base
        self.end = base + size
        self.name = name
        self._used: list[tuple[int, int]] = []  # sorted (start, end)
        self._lock = threading.Lock()

    def allocate(self, size: int, alignment: int = 1, at: int | None = None) -> int:
        """Reserve ``size`` bytes; at ``at`` exactly when given, else the lowest aligned fit."""
        if size <= 0 or alignment <= 0 or alignment & (alignment - 1):
            raise BusError(f"{self.name}: bad request size={size:#x} alignment={alignment:#x}")
        with self._lock:
            if at is not None:
                if at % alignment or not self._free(at, size):
                    raise BusError(f"{self.name}: {at:#x}+{size:#x} is not available")
                return self._take(at, size)
            candidate = _align_up(self.base, alignment)
            for start, end in self._used:
                if candidate + size <= start:
                    break
                candidate = max(candidate, _align_up(end, alignment))
            if candidate + size > self.end:
                raise BusError(f"{self.name}: no room for {size:#x} bytes")
            return self._take(candidate, size)

    def free(self, start: int) -> None:
        with self._lock:
            for index, (used_start, _) in enumerate(self._used):
                if used_start == start:
                    del self._used[index]
                    return
        raise BusError(f"{self.name}: {start:#x} was not allocated")

    def _free(self, start: int, size: int) -> bool:
        if start < self.base or start + size > self.end:
            return False
        return all(start + size <= s or e <= start for s, e in self._used)

    def _take(self, start: int, size: int) -> int:
        self._used.append((start, start + size))
        self._used.sort()
        return start


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
