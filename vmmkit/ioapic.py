"""An Intel 82093AA I/O APIC model, for backends whose hypervisor has none (emu's engine, and
the root partition's VMM on the Microsoft Hypervisor, as Cloud Hypervisor emulates it there):
IOREGSEL at 0x00, IOWIN at 0x10, the EOI register at 0x40 (version 0x20), 24 redirection
entries from register 0x10 (82093AA datasheet, 3.2). Edge-triggered pins deliver on a rising
edge; level-triggered ones while asserted, once until the local APIC's EOI clears the remote
IRR (:meth:`IoApic.eoi`). Delivery is the backend's callback."""

from __future__ import annotations

import threading
from collections.abc import Callable

IOAPIC_BASE = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
IOAPIC_PINS = 24
_IOREGSEL = 0x00
_IOWIN = 0x10
_IOEOI = 0x40
_REDIR_MASKED = 1 << 16
_REDIR_LEVEL = 1 << 15
_REDIR_REMOTE_IRR = 1 << 14
_REDIR_LOGICAL = 1 << 11

#: Delivery modes (ICR, MSI data, redirection entries: bits 10:8).
FIXED = 0
LOWEST_PRIORITY = 1
NMI = 4
INIT = 5
STARTUP = 6
EXTINT = 7

#: Deliver(vector, destination, mode, logical, level, pin or -1)
Deliver = Callable[[int, int, int, bool, bool, int], None]


class IoApic:
    """The 82093AA's register file and pin logic."""

    def __init__(self, deliver: Deliver, apic_id: int = 0) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._select = 0
        self._id = apic_id
        self._redirection = [_REDIR_MASKED] * IOAPIC_PINS
        self._levels = [False] * IOAPIC_PINS

    # -- registers --------------------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index == 0x00:
            return self._id << 24
        if index == 0x01:
            return (IOAPIC_PINS - 1) << 16 | 0x20  # version 0x20: has the EOI register
        if index == 0x02:
            return self._id << 24
        if 0x10 <= index < 0x10 + 2 * IOAPIC_PINS:
            entry = self._redirection[(index - 0x10) // 2]
            return entry >> 32 if index & 1 else entry & 0xFFFF_FFFF
        return 0

    def mmio_read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == _IOREGSEL:
                value = self._select
            elif offset == _IOWIN:
                value = self._read_register(self._select)
            else:
                value = 0
        return (value & 0xFFFF_FFFF).to_bytes(4, "little")[:size].ljust(size, b"\0")

    def mmio_write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data[:4], "little")
        fire: list[int] = []
        with self._lock:
            if offset == _IOREGSEL:
                self._select = value & 0xFF
            elif offset == _IOWIN:
                index = self._select
                if index == 0x00:
                    self._id = (value >> 24) & 0xF
                elif 0x10 <= index < 0x10 + 2 * IOAPIC_PINS:
                    pin = (index - 0x10) // 2
                    old = self._redirection[pin]
                    if index & 1:
                        new = (old & 0xFFFF_FFFF) | value << 32
                    else:  # remote IRR and delivery status are read-only
                        keep = old & (_REDIR_REMOTE_IRR | 1 << 12)
                        new = (old & ~0xFFFF_FFFF) | (value & ~(_REDIR_REMOTE_IRR | 1 << 12)) | keep
                    self._redirection[pin] = new
                    if self._levels[pin] and new & _REDIR_LEVEL and not new & (_REDIR_MASKED | _REDIR_REMOTE_IRR):
                        fire.append(pin)  # unmasking an asserted level line delivers it
            elif offset == _IOEOI:
                fire = self._eoi_locked(value & 0xFF)
        for pin in fire:
            self._fire(pin)

    # -- pins -------------------------------------------------------------------------------

    def set_level(self, pin: int, level: bool) -> None:
        if not 0 <= pin < IOAPIC_PINS:
            return
        with self._lock:
            old = self._levels[pin]
            self._levels[pin] = level
            entry = self._redirection[pin]
            if entry & _REDIR_MASKED or not level:
                return
            if entry & _REDIR_LEVEL:
                if entry & _REDIR_REMOTE_IRR:
                    return
            elif old:
                return  # edge-triggered: only a rising edge
        self._fire(pin)

    def _fire(self, pin: int) -> None:
        with self._lock:
            entry = self._redirection[pin]
            if entry & _REDIR_MASKED:
                return
            level = bool(entry & _REDIR_LEVEL)
            if level:
                self._redirection[pin] = entry | _REDIR_REMOTE_IRR
        self._deliver(entry & 0xFF, entry >> 56, (entry >> 8) & 7, bool(entry & _REDIR_LOGICAL), level, pin)

    def _eoi_locked(self, vector: int) -> list[int]:
        again = []
        for pin, entry in enumerate(self._redirection):
            if entry & _REDIR_LEVEL and entry & _REDIR_REMOTE_IRR and entry & 0xFF == vector:
                self._redirection[pin] = entry & ~_REDIR_REMOTE_IRR
                if self._levels[pin] and not entry & _REDIR_MASKED:
                    again.append(pin)
        return again

    def eoi(self, vector: int) -> None:
        """A local APIC's EOI of a level-triggered ``vector`` (the broadcast EOI)."""
        with self._lock:
            again = self._eoi_locked(vector)
        for pin in again:
            self._fire(pin)

    # -- snapshots (the owner's save_state / restore_state, vmmkit.x86_platform's layout) --------

    def save_registers(self) -> tuple[int, int, int, tuple[int, ...]]:
        """``(id, IOREGSEL, asserted pins as a bitmask, redirection table)``."""
        with self._lock:
            levels = sum(1 << pin for pin, high in enumerate(self._levels) if high)
            return self._id, self._select, levels, tuple(self._redirection)

    def restore_registers(self, apic_id: int, select: int, levels: int, redirection: tuple[int, ...]) -> None:
        if len(redirection) != IOAPIC_PINS:
            raise ValueError(f"an I/O APIC has {IOAPIC_PINS} redirection entries, not {len(redirection)}")
        with self._lock:
            self._id, self._select = apic_id & 0xF, select & 0xFF
            self._levels = [bool(levels >> pin & 1) for pin in range(IOAPIC_PINS)]
            self._redirection = list(redirection)
