"""A 16550A UART (device type ``serial-16550``), the PC's ``ttyS0`` at 0x3f8 / IRQ 4.

Enough of the chip for Linux's 8250 driver to identify it as a 16550A (``autoconfig()``: the
IER and scratch tests, the MCR loopback test through MSR, FIFO detection through IIR bits 6-7,
the divisor latch behind LCR.DLAB, a 16-byte FIFO in loopback) and to run it with interrupts.

Behaviour worth knowing:

- Transmission is instantaneous: a THR write goes straight to the console backend, so LSR
  always reads THRE|TEMT and the THR-empty interrupt becomes pending again at once. IIR follows
  the 16550 priority order RLS > RX data > THR empty > modem status; reading IIR clears a
  THR-empty interrupt, as on the chip.
- The interrupt output is an edge: the line is triggered when IIR goes from "no interrupt" to
  "interrupt pending" (one interrupt per transmit burst, not one per byte), and again whenever
  the guest rewrites IER while an interrupt is pending (the recovery path a level line would
  give; Linux's THRE tests rely on it).
- RX: host input waits in a 4 KiB buffer the guest reads through RBR; the data-ready interrupt
  is raised as soon as one byte is there (no trigger levels, no character timeout: Linux
  treats both the same). When the buffer is full the backend stops reading the host. In
  loopback the FIFO holds 16 bytes (Linux's ``size_fifo()`` must not count 64, or it decides
  the chip is a U6 16550A) and host input waits.
- Outside loopback the modem lines read as a connected modem (DCD, DSR, CTS).

Optional fast path (see :meth:`Serial16550.bind_native_ports`): while the UART is in its plain
state, a hypervisor backend may serve THR writes and LSR reads natively.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.acpi import aml
from vmmkit.device import DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.eventloop import EventLoop
from vmmkit.hypervisor import PortSink
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.state import StateError, restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.console.backends import ConsoleBackend
from vmmkit_devices.console.uart import create_uart
from vmmkit_devices.device_types import Serial16550Type as Serial16550Type  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

# Register offsets (DLAB=0 names; DLAB=1 puts the divisor latch at 0 and 1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08
IER_MASK = 0x0F

IIR_MSI = 0x00
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_TRIGGER_MASK = 0xC0

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

#: The FIFO depth the guest can measure (in loopback).
FIFO_SIZE = 16
#: Host input held for the guest before the backend stops reading.
RX_BUFFER = 4096
#: Power-on divisor: 9600 baud from the PC's 1.8432 MHz clock.
DEFAULT_DIVISOR = 0x0C

#: ``update(sinks)`` callback of :meth:`Serial16550.bind_native_ports`.
NativePortsUpdate = Callable[[Sequence[PortSink]], object]


class Serial16550(ByteRegisters):
    """The UART. ``backend`` carries bytes to and from the host; ``line`` is its interrupt."""

    kind: ClassVar[str] = "serial-16550"
    length: ClassVar[int] = 8

    def __init__(
        self, device_id: str, backend: ConsoleBackend, line: InterruptLine, *, irq: int | None = None
    ) -> None:
        super().__init__(device_id)
        self.backend = backend
        self.irq = irq
        self._line = line
        self._lock = threading.Lock()
        self._native_update: NativePortsUpdate | None = None
        self._native_on: bool | None = None
        self._native_served = False
        self._devnull = -1
        self._paused = False
        self._closed = False
        self.interrupts = 0
        self.overruns = 0
        self._power_on()

    def _power_on(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._dll = DEFAULT_DIVISOR
        self._dlm = 0
        self._lsr_errors = 0
        self._msr_delta = 0
        self._rx: deque[int] = deque()
        self._thr_pending = False
        self._irq_high = False

    # -- host side ---------------------------------------------------------------------------

    def attach_input(self, loop: EventLoop) -> None:
        """Deliver the backend's host input from ``loop``."""
        self.backend.attach(loop, self)

    def room(self) -> int:
        """How much host input the UART takes now (:class:`~vmmkit_devices.console.InputSink`)."""
        with self._lock:
            if self._paused or self._closed or self._mcr & MCR_LOOP:
                return 0
            return max(0, RX_BUFFER - len(self._rx))

    def receive(self, data: bytes) -> None:
        """Host input: queue it for the guest and raise the data-ready interrupt."""
        with self._lock:
            if self._closed or self._mcr & MCR_LOOP:
                return
            self._rx.extend(data[: max(0, RX_BUFFER - len(self._rx))])
            self._update()

    # -- guest side --------------------------------------------------------------------------

    def read_byte(self, offset: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update()
            return value

    def write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            force = self._write(offset, value)
            self._update(force)

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self._dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            if len(self._rx) <= RX_BUFFER // 2:
                self.backend.input_ready()  # cheap unless the backend stopped reading
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iid = self._interrupt_id()
            if iid == IIR_THRI:
                self._thr_pending = False
            return iid | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            self._lsr_errors = 0
            return value
        if offset == MSR:
            value = self._modem_lines() | self._msr_delta
            self._msr_delta = 0
            return value
        return self._scr

    def _write(self, offset: int, value: int) -> bool:
        """Apply a register write; ``True`` when IER changed (re-pulse a pending interrupt)."""
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
                return False
            new = value & IER_MASK
            changed = new ^ self._ier
            self._ier = new
            if changed & IER_THRI:
                # THR is always empty here: enabling THRI makes the interrupt pending at once.
                self._thr_pending = bool(new & IER_THRI)
            return bool(changed)
        elif offset == FCR:
            if (value ^ self._fcr) & FCR_ENABLE_FIFO or value & FCR_CLEAR_RCVR:
                self._clear_rx()
            self._fcr = value & (FCR_ENABLE_FIFO | FCR_TRIGGER_MASK)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            before = self._modem_lines()
            was_loop = self._mcr & MCR_LOOP
            self._mcr = value & MCR_MASK
            after = self._modem_lines()
            changed = before ^ after
            if changed & MSR_CTS:
                self._msr_delta |= MSR_DCTS
            if changed & MSR_DSR:
                self._msr_delta |= MSR_DDSR
            if changed & MSR_DCD:
                self._msr_delta |= MSR_DDCD
            if before & MSR_RI and not after & MSR_RI:
                self._msr_delta |= MSR_TERI
            if was_loop and not self._mcr & MCR_LOOP:
                self.backend.input_ready()
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes (factory test) are ignored.
        return False

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            depth = FIFO_SIZE if self._fcr & FCR_ENABLE_FIFO else 1
            if len(self._rx) >= depth:
                self._lsr_errors |= LSR_OE
                self.overruns += 1
            else:
                self._rx.append(value)
        else:
            self.backend.write(bytes((value,)))
        self._thr_pending = True  # sent at once: THR is empty again

    def _clear_rx(self) -> None:
        self._rx.clear()
        self.backend.input_ready()

    def _modem_lines(self) -> int:
        mcr = self._mcr
        if mcr & MCR_LOOP:
            return ((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5) | ((mcr & (MCR_OUT1 | MCR_OUT2)) << 4)
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _interrupt_id(self) -> int:
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update(self, force: bool = False) -> None:
        """Drive the interrupt line and the native fast path from the new state (locked)."""
        high = self._interrupt_id() != IIR_NO_INT
        if high and (force or not self._irq_high) and not self._closed:
            self.interrupts += 1
            self._line.trigger()
        self._irq_high = high
        if self._native_update is not None:
            self._update_native()

    # -- native fast path --------------------------------------------------------------------

    def bind_native_ports(self, update: NativePortsUpdate) -> None:
        """Let the device's owner serve the plain UART natively.

        The device calls ``update(sinks)`` now and whenever the set changes: ``sinks`` are
        :class:`~vmmkit.hypervisor.PortSink` s with ``port`` relative to the device's base (the
        owner adds the base), the complete set the backend should serve from then on; ``()``
        means none. While the UART is plain (DLAB=0, no loopback, THR-empty interrupt off, no
        received byte or line error waiting) these are THR (offset 0: writes to the console's
        output fd, reads 0) and LSR (offset 5: reads THRE|TEMT, writes to ``/dev/null``).
        Every other register stays on the slow path, where every change that ends the plain
        state happens, so the sinks are always withdrawn before the access that needs the
        device completes.

        ``update`` is called synchronously with the device's lock held, from the thread that
        changed the state (a vCPU thread for register writes, the event loop for host input,
        the caller of :meth:`close` / :meth:`reset`): it must not call back into the device
        nor wait for a lock held while calling into devices. Its truthy return means the
        backend serves them (``False``: it cannot, the slow path goes on working).
        """
        with self._lock:
            if self._devnull < 0:
                self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            self._native_update = update
            self._native_on = None
            self._update_native()

    def native_port_sinks(self) -> tuple[PortSink, ...]:
        """The sinks a backend may serve right now (relative ports; empty when not plain)."""
        with self._lock:
            return self._sinks() if self._plain() else ()

    @property
    def native(self) -> bool:
        """Whether the backend is serving THR natively now."""
        return bool(self._native_on and self._native_served)

    def _plain(self) -> bool:
        return (
            not self._closed
            and self.backend.output_fd >= 0
            and not self._lcr & LCR_DLAB
            and not self._mcr & MCR_LOOP
            and not self._ier & IER_THRI
            and not self._rx
            and not self._lsr_errors
        )

    def _sinks(self) -> tuple[PortSink, ...]:
        label = f"{self.id} THR"
        return (
            PortSink(port=THR, fd=self.backend.output_fd, label=label, read_value=0),
            PortSink(port=LSR, fd=self._devnull, label=f"{self.id} LSR", read_value=LSR_THRE | LSR_TEMT),
        )

    def _update_native(self) -> None:
        on = self._plain() and self._devnull >= 0
        if on == self._native_on or self._native_update is None:
            return
        self._native_on = on
        try:
            self._native_served = bool(self._native_update(self._sinks() if on else ()))
        except Exception:
            log.exception("serial.native_update_failed", device=self.id)
            self._native_update = None
            self._native_served = False

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
            if self._native_update is not None and self._native_on:
                try:
                    self._native_update(())
                except Exception:
                    log.exception("serial.native_update_failed", device=self.id)
            self._native_update = None
            self._native_on = False
            self.backend.close()
            if self._devnull >= 0:
                os.close(self._devnull)
                self._devnull = -1

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {
        "_ier": "int", "_lcr": "int", "_mcr": "int", "_fcr": "int", "_scr": "int", "_dll": "int",
        "_dlm": "int", "_lsr_errors": "int", "_msr_delta": "int", "_thr_pending": "bool", "_irq_high": "bool",
    }

    def save_state(self) -> dict[str, Any]:
        """The registers and the received bytes not yet read."""
        with self._lock:
            return {**save_named(self, self._STATE), "rx": list(self._rx)}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        rx = state.get("rx")
        if not isinstance(rx, list) or not all(isinstance(b, int) and 0 <= b <= 0xFF for b in rx):
            raise StateError(f"{self.id}.rx: expected a list of bytes")
        with self._lock:
            restore_fields(self, state, self._STATE, self.id)
            self._rx = deque(rx)
            if self._native_update is not None:
                self._update_native()

    def counters(self) -> Mapping[str, int]:
        return {
            **self.backend.counters(),
            "interrupts": self.interrupts,
            "overruns": self.overruns,
            "native": int(self.native),
            **super().counters(),
        }

    def firmware_properties(self) -> Mapping[str, Any]:
        return {"irq": self.irq} if self.irq is not None else {}

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``PNP0501`` (a 16550A) with its ports and interrupt, ``\\_SB_.COMn``."""
        index = scope.next_index("serial")
        name = f"COM{index + 1}" if index < 9 else f"CO{index + 1:02X}"
        scope.add(aml.simple_device(name, aml.EisaId("PNP0501"), index + 1,
                                    [*aml.io_ports(placed.pio), *aml.legacy_irq(placed.irq)]))


def create(ctx: DeviceContext, request: DeviceRequest) -> Serial16550 | None:
    """``Serial16550Type.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    return create_uart(ctx, request, Serial16550)
