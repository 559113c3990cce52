"""The ARM PL011 UART (device type ``pl011``), the console of an AArch64 VM (0x09000000, SPI 1).

Enough of the PrimeCell for Linux's ``amba-pl011`` driver and for polled firmware output:

- Transmission is instantaneous: a DR write goes straight to the console backend; FR always
  says TXFE (transmit FIFO empty) and never TXFF/BUSY, and TXRIS is set again after each write.
- Receive: host input waits in a buffer (32 bytes when LCR_H.FEN enables the FIFO, one
  otherwise, as on the chip) read through DR; FR.RXFE / RXFF follow it; RXRIS is set while
  data waits (no receive-timeout distinction: RTRIS follows RXRIS).
- Interrupts: one level line, high while RIS & IMSC is non-zero; ICR clears RIS bits.
- Baud rate, line control, DMA and modem lines are stored and read back, without effect.
- PeriphID = 0x00141011 (r1p5), CellID = 0xB105F00D, as QEMU's.

Registers are 32 bits wide; narrower reads and writes of one register are allowed, accesses
that straddle two registers or fall outside the 4 KiB block read as all ones and are ignored.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vmmkit.device import Device, DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.state import StateError, field, int_field
from vmmkit_devices.console.backends import ConsoleBackend
from vmmkit_devices.console.uart import create_uart
from vmmkit_devices.device_types import Pl011Type as Pl011Type  # declared there, re-exported
from vmmkit_devices.legacy._amba import id_register, split, value_bytes

if TYPE_CHECKING:
    from vmmkit.firmware import FdtWriter

log = get_logger()

DR: Final = 0x000
RSR: Final = 0x004
FR: Final = 0x018
ILPR: Final = 0x020
IBRD: Final = 0x024
FBRD: Final = 0x028
LCR_H: Final = 0x02C
CR: Final = 0x030
IFLS: Final = 0x034
IMSC: Final = 0x038
RIS: Final = 0x03C
MIS: Final = 0x040
ICR: Final = 0x044
DMACR: Final = 0x048

FR_RXFE: Final = 1 << 4
FR_TXFF: Final = 1 << 5
FR_RXFF: Final = 1 << 6
FR_TXFE: Final = 1 << 7
LCR_H_FEN: Final = 1 << 4
INT_RX: Final = 1 << 4
INT_TX: Final = 1 << 5
INT_RT: Final = 1 << 6
INT_MASK: Final = 0x7FF
FIFO_DEPTH: Final = 32
#: Host input held for the guest beyond the FIFO before the backend stops reading.
RX_BUFFER: Final = 4096
PERIPH_ID: Final = (0x11, 0x10, 0x14, 0x00)
_STORED: Final = (ILPR, IBRD, FBRD, LCR_H, CR, IFLS, DMACR)


class Pl011(Device):
    """The UART. ``backend`` carries bytes to and from the host; ``line`` is its interrupt."""

    kind: ClassVar[str] = "pl011"

    def __init__(self, device_id: str, backend: ConsoleBackend, line: InterruptLine | None,
                 *, irq: int | None = None) -> None:
        super().__init__(device_id)
        self.backend = backend
        self.irq = irq
        self._line = line
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._regs: dict[int, int] = {}
        self._imsc = 0
        self._ris = 0
        self._level = False
        self._paused = False
        self._closed = False
        self.tx_bytes = 0
        self._power_on()

    def _power_on(self) -> None:
        self._regs = {reg: 0 for reg in _STORED}
        self._regs[CR] = 0x300  # TXE | RXE
        self._regs[IFLS] = 0x12
        self._imsc = 0
        self._ris = 0
        self._rx.clear()

    # -- host side ---------------------------------------------------------------------------

    def attach_input(self, loop: Any) -> None:
        self.backend.attach(loop, self)

    def room(self) -> int:
        with self._lock:
            if self._paused or self._closed:
                return 0
            return max(0, RX_BUFFER - len(self._rx))

    def receive(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._rx.extend(data[: max(0, RX_BUFFER - len(self._rx))])
            if self._rx:
                self._ris |= INT_RX | INT_RT
            self._update()

    # -- guest side --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        where = split(offset, size)
        if where is None:
            return b"\xff" * max(0, min(size, 8))
        register, shift = where
        with self._lock:
            value = self._read(register)
            self._update()
        return value_bytes(value, shift, size)

    def write(self, offset: int, data: bytes) -> None:
        where = split(offset, len(data))
        if where is None:
            return
        register, shift = where
        value = int.from_bytes(data, "little") << shift
        with self._lock:
            self._write(register, value)
            self._update()

    def _read(self, register: int) -> int:
        if register == DR:
            if not self._rx:
                return 0
            value = self._rx.popleft()
            if not self._rx:
                self._ris &= ~(INT_RX | INT_RT)
                self.backend.input_ready()
            return value
        if register == FR:
            flags = FR_TXFE
            if not self._rx:
                flags |= FR_RXFE
            elif len(self._rx) >= self._fifo_depth():
                flags |= FR_RXFF
            return flags
        if register == RSR:
            return 0
        if register == IMSC:
            return self._imsc
        if register == RIS:
            return self._ris
        if register == MIS:
            return self._ris & self._imsc
        if register in self._regs:
            return self._regs[register]
        ident = id_register(register, PERIPH_ID)
        return ident if ident is not None else 0

    def _write(self, register: int, value: int) -> None:
        if register == DR:
            self.backend.write(bytes((value & 0xFF,)))
            self.tx_bytes += 1
            self._ris |= INT_TX
        elif register == IMSC:
            self._imsc = value & INT_MASK
        elif register == ICR:
            self._ris &= ~value
            if self._rx:  # data still waiting keeps its status
                self._ris |= INT_RX | INT_RT
        elif register in self._regs:
            self._regs[register] = value & 0xFFFF
        # RSR/ECR writes clear errors (there are none); the rest is read-only.

    def _fifo_depth(self) -> int:
        return FIFO_DEPTH if self._regs[LCR_H] & LCR_H_FEN else 1

    def _update(self) -> None:
        level = bool(self._ris & self._imsc)
        if level != self._level and self._line is not None:
            self._level = level
            self._line.set_level(level)

    # -- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._power_on()
            self._update()
        self.backend.input_ready()

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self.backend.input_ready()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.backend.close()

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The stored registers by offset, IMSC, RIS and the received bytes not yet read."""
        with self._lock:
            return {"registers": {f"{reg:#05x}": self._regs[reg] for reg in _STORED}, "imsc": self._imsc,
                    "ris": self._ris, "rx": list(self._rx)}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        registers = field(state, "registers", dict, self.id)
        values = {}
        for reg in _STORED:
            values[reg] = int_field(registers, f"{reg:#05x}", f"{self.id}.registers", 0, 0xFFFF)
        imsc = int_field(state, "imsc", self.id, 0, INT_MASK)
        ris = int_field(state, "ris", self.id, 0, INT_MASK)
        rx = field(state, "rx", list, self.id)
        if len(rx) > RX_BUFFER or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 0xFF
                                          for b in rx):
            raise StateError(f"{self.id}.rx: expected at most {RX_BUFFER} bytes")
        with self._lock:
            self._regs = values
            self._imsc, self._ris = imsc, ris
            self._rx = deque(rx)
            self._update()

    def counters(self) -> Mapping[str, int]:
        return {**self.backend.counters(), "tx_bytes": self.tx_bytes}

    def firmware_properties(self) -> Mapping[str, Any]:
        return {"irq": self.irq} if self.irq is not None else {}

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """``arm,pl011`` (Documentation/devicetree/bindings/serial/pl011.yaml); the console."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        fdt.begin_node(f"pl011@{base:x}")
        fdt.property_strings("compatible", "arm,pl011", "arm,primecell")
        fdt.property_reg(base, size)
        if placed.irq is not None:
            fdt.property_interrupt(placed.irq, edge=False)
        fdt.property_clocks("uartclk", "apb_pclk")
        fdt.end_node()
        fdt.set_stdout(f"/pl011@{base:x}")


def create(ctx: DeviceContext, request: DeviceRequest) -> Pl011 | None:
    """``Pl011Type.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    return create_uart(ctx, request, Pl011)
