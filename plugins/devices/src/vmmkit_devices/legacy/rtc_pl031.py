"""The ARM PL031 real-time clock (device type ``rtc-pl031``), at 0x09010000 / SPI 2 on AArch64.

- DR (0x00) reads the host's UTC time in seconds plus an offset; a write of LR (0x08) sets the
  time (changes only the offset). CR (0x0C) reads 1: the counter always runs.
- MR (0x04) is the match register: RIS (0x14) bit 0 is set once the time reaches MR (at once if
  MR is written with a time already reached, as QEMU does; checked on every access and by a
  timer), once per MR write; IMSC (0x10) masks it onto the level interrupt line, ICR (0x1C)
  clears it; MIS (0x18) = RIS & IMSC.
- PeriphID = 0x00141031, CellID = 0xB105F00D, as QEMU's.

Registers are 32 bits; narrower accesses of one register are allowed, others read as all ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.device import Device, DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.irq import InterruptLine
from vmmkit.state import restore_fields, save_named
from vmmkit_devices.device_types import Pl031Type as Pl031Type  # declared there, re-exported
from vmmkit_devices.legacy._amba import id_register, split, value_bytes

if TYPE_CHECKING:
    from vmmkit.firmware import FdtWriter

DR: Final = 0x00
MR: Final = 0x04
LR: Final = 0x08
CR: Final = 0x0C
IMSC: Final = 0x10
RIS: Final = 0x14
MIS: Final = 0x18
ICR: Final = 0x1C
PERIPH_ID: Final = (0x31, 0x10, 0x14, 0x00)


class Pl031(Device):
    """The RTC; ``clock`` returns host seconds (``time.time`` by default, for tests)."""

    kind: ClassVar[str] = "rtc-pl031"

    def __init__(self, device_id: str, line: InterruptLine | None, *, irq: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(device_id)
        self.irq = irq
        self._line = line
        self._clock = clock
        self._lock = threading.Lock()
        self._offset = 0
        self._match = 0
        self._imsc = 0
        self._ris = 0
        self._fired = True  # no match armed until MR is written
        self._level = False
        self._timer: threading.Timer | None = None
        self._closed = False

    def now(self) -> int:
        return (int(self._clock()) + self._offset) & 0xFFFF_FFFF

    def read(self, offset: int, size: int) -> bytes:
        where = split(offset, size)
        if where is None:
            return b"\xff" * max(0, min(size, 8))
        register, shift = where
        with self._lock:
            self._check_match()
            value = self._read(register)
        return value_bytes(value, shift, size)

    def _read(self, register: int) -> int:
        if register == DR:
            return self.now()
        if register == MR:
            return self._match
        if register == LR:
            return self.now()
        if register == CR:
            return 1
        if register == IMSC:
            return self._imsc
        if register == RIS:
            return self._ris
        if register == MIS:
            return self._ris & self._imsc
        ident = id_register(register, PERIPH_ID)
        return ident if ident is not None else 0

    def write(self, offset: int, data: bytes) -> None:
        where = split(offset, len(data))
        if where is None:
            return
        register, shift = where
        value = (int.from_bytes(data, "little") << shift) & 0xFFFF_FFFF
        with self._lock:
            if register == LR:
                self._offset = value - int(self._clock())
            elif register == MR:
                self._match = value
                self._fired = False
            elif register == IMSC:
                self._imsc = value & 1
            elif register == ICR:
                self._ris &= ~value & 1
            self._check_match()
            self._arm()

    def _check_match(self) -> None:
        if not self._fired and (self.now() - self._match) & 0xFFFF_FFFF < 1 << 31:
            self._fired = True
            self._ris |= 1
        level = bool(self._ris & self._imsc)
        if level != self._level and self._line is not None:
            self._level = level
            self._line.set_level(level)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed or self._fired:
            return
        delay = (self._match - self.now()) & 0xFFFF_FFFF
        if delay > 24 * 3600:
            return
        self._timer = threading.Timer(delay + 0.01, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._check_match()

    def reset(self) -> None:
        with self._lock:
            self._match = self._imsc = self._ris = 0
            self._fired = True
            self._check_match()
            self._arm()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {"_offset": "int", "_match": "int", "_imsc": "int", "_ris": "int",
                                        "_fired": "bool"}

    def save_state(self) -> dict[str, Any]:
        """The offset from the host's clock (the guest's time goes on with the host's, as a
        battery-backed RTC's), the match register, IMSC, RIS and whether the match fired."""
        with self._lock:
            return save_named(self, self._STATE)

    def restore_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            restore_fields(self, state, self._STATE, self.id)
            self._check_match()
            self._arm()

    def counters(self) -> Mapping[str, int]:
        return {}

    def firmware_properties(self) -> Mapping[str, Any]:
        return {"irq": self.irq} if self.irq is not None else {}

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """``arm,pl031`` (Documentation/devicetree/bindings/rtc/arm,pl031.yaml)."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        fdt.begin_node(f"pl031@{base:x}")
        fdt.property_strings("compatible", "arm,pl031", "arm,primecell")
        fdt.property_reg(base, size)
        if placed.irq is not None:
            fdt.property_interrupt(placed.irq, edge=False)
        fdt.property_clocks("apb_pclk")
        fdt.end_node()


def create(ctx: DeviceContext, request: DeviceRequest) -> Pl031:
    """``Pl031Type.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    irq, line = ctx.interrupt_line(request.irq)
    return Pl031(request.id, line, irq=irq)
