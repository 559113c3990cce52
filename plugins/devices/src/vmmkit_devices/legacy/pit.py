"""An Intel 8254 programmable interval timer (device type ``i8254``) at ports 0x40-0x43.

For VMs whose hypervisor does not emulate the PC's PIT (a KVM host where the in-kernel PIT is
unusable: see the KVM plugin's host quirks). Three counters driven by a 1.193182 MHz clock;
counter 0's output raises the device's interrupt line (ISA IRQ 0) on every rising edge.

- Modes 0-5, binary counting (a BCD request is remembered in the status byte, but counts
  are binary, as Linux never asks for BCD), LSB / MSB / LSB-then-MSB access, counter latch
  and read-back commands (count and status), the null-count flag.
- Gates: counters 0 and 1 are always enabled (their gates are tied high on a PC); counter 2's
  gate (port 0x61 bit 0) is not wired here, so it counts freely. Modes 1 and 5 start only on a
  gate edge, so on counters 0 and 1 they never fire.
- Interrupts: modes 2 and 3 are periodic (one edge per period), mode 0 fires once at terminal
  count, mode 4 once when the strobe ends. A timer thread sleeps until the next edge; edges it
  could not deliver in time (the host was busy) are merged into one, as an edge-triggered
  interrupt controller would.
- **Clock dilation**: with ``dilation = N`` the counters run N times slower than wall-clock
  time (the input clock is 1.193182 MHz / N in host time). A guest whose TSC frequency is also
  reported N times too high (``tsc_early_khz=``) then sees one consistent, slowed-down clock;
  this keeps a guest whose kernel code is emulated at ~1 µs per instruction from spending all
  its time in timer interrupts (see ``shared/notes/pvm-host.md``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.sandbox import DEVICE, enter_thread
from vmmkit.state import StateError, restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import I8254Type as I8254Type  # declared there, re-exported

log = get_logger()

#: The PIT's input clock in Hz.
PIT_HZ = 1_193_182
CONTROL = 3

RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3

READ_BACK = 3  #: the "counter" field of a control word that is a read-back command
RB_NO_COUNT = 0x20
RB_NO_STATUS = 0x10

STATUS_OUT = 0x80
STATUS_NULL_COUNT = 0x40


class _Counter:
    """One counter's programming and latches; times are in counter ticks."""

    def __init__(self) -> None:
        self.mode = 0
        self.rw = RW_WORD
        self.bcd = False
        self.count = 0x10000  #: the reload value (0 written means 65536)
        self.loaded_at = 0  #: tick at which the count was loaded (counting starts)
        self.armed = False  #: a count was written since the last control word
        self.null_count = True
        self.write_low: int | None = None  #: first byte of a word write, waiting for the second
        self.latched: list[int] = []  #: latched count bytes still to read
        self.status: int | None = None  #: a latched status byte
        self.read_high = False  #: next (unlatched) word read returns the MSB

    def program(self, rw: int, mode: int, bcd: bool) -> None:
        self.rw = rw
        self.mode = mode if mode < 6 else mode - 4  # modes 6 and 7 are 2 and 3
        self.bcd = bcd
        self.armed = False
        self.null_count = True
        self.write_low = None
        self.read_high = False

    def value(self, now: int) -> int:
        """The counting element at tick ``now`` (16 bits)."""
        if not self.armed:
            return self.count & 0xFFFF
        elapsed = now - self.loaded_at
        if self.mode == 3:
            return (self.count - (2 * elapsed) % self.count) & 0xFFFF
        if self.mode == 2:
            return (self.count - elapsed % self.count) & 0xFFFF
        return (self.count - elapsed) & 0xFFFF

    def output(self, now: int) -> bool:
        """The OUT pin at tick ``now``."""
        elapsed = now - self.loaded_at
        if self.mode == 0:
            return self.armed and elapsed >= self.count
        if not self.armed:
            return True
        if self.mode == 2:
            return elapsed % self.count != self.count - 1
        if self.mode == 3:
            return elapsed % self.count < (self.count + 1) // 2
        if self.mode == 4:
            return elapsed != self.count
        return True  # modes 1 and 5 wait for a gate edge that never comes

    def next_edge(self, now: int) -> int | None:
        """The first tick after ``now`` at which OUT rises (an interrupt), if any."""
        if not self.armed:
            return None
        elapsed = now - self.loaded_at
        if self.mode == 0:
            return self.loaded_at + self.count if elapsed < self.count else None
        if self.mode == 4:
            return self.loaded_at + self.count + 1 if elapsed <= self.count else None
        if self.mode in (2, 3):
            periods = elapsed // self.count + 1
            return self.loaded_at + periods * self.count
        return None


class I8254(ByteRegisters):
    """The PIT. ``clock`` returns host seconds (monotonic); tests pass their own, with
    ``threaded=False`` to step interrupts by hand through :meth:`poll`."""

    kind: ClassVar[str] = "i8254"
    length: ClassVar[int] = 4

    def __init__(
        self,
        device_id: str,
        line: InterruptLine | None = None,
        *,
        dilation: int = 1,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
    ) -> None:
        super().__init__(device_id)
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"clock dilation must be a positive integer, not {dilation!r}")
        self.dilation = dilation
        self._clock = clock
        self._epoch = clock()
        self._line = line
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._counters = [_Counter() for _ in range(3)]
        self._next_irq: int | None = None
        self._paused_at: int | None = None
        self._missed_edge = False
        self._closed = False
        self.interrupts = 0
        self.merged = 0
        self._threaded = threaded and line is not None
        self._thread: threading.Thread | None = None  # started when the guest first programs counter 0

    # -- time ----------------------------------------------------------------------------------

    def ticks(self) -> int:
        """The PIT clock's tick count since the device was made (dilated)."""
        if self._paused_at is not None:
            return self._paused_at
        return int((self._clock() - self._epoch) * PIT_HZ / self.dilation)

    def _host_time(self, tick: int) -> float:
        return self._epoch + tick * self.dilation / PIT_HZ

    # -- registers -----------------------------------------------------------------------------

    def read_byte(self, offset: int) -> int:
        if offset == CONTROL:
            return 0xFF  # the control word register is write-only
        with self._lock:
            counter = self._counters[offset]
            if counter.status is not None:
                status, counter.status = counter.status, None
                return status
            if counter.latched:
                return counter.latched.pop(0)
            value = counter.value(self.ticks())
            if counter.rw == RW_LSB:
                return value & 0xFF
            if counter.rw == RW_MSB:
                return value >> 8
            high, counter.read_high = counter.read_high, not counter.read_high
            return value >> 8 if high else value & 0xFF

    def write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == CONTROL:
                self._control(value)
            else:
                self._write_count(self._counters[offset], offset, value)

    def _control(self, value: int) -> None:
        select = value >> 6
        rw = (value >> 4) & 3
        if select == READ_BACK:
            now = self.ticks()
            for index in range(3):
                if value & (2 << index):
                    counter = self._counters[index]
                    if not value & RB_NO_COUNT and not counter.latched:
                        counter.latched = self._latch(counter, now)
                    if not value & RB_NO_STATUS and counter.status is None:
                        counter.status = self._status(counter, now)
            return
        counter = self._counters[select]
        if rw == RW_LATCH:
            if not counter.latched:
                counter.latched = self._latch(counter, self.ticks())
            return
        counter.program(rw, (value >> 1) & 7, bool(value & 1))
        if select == 0:
            self._reschedule()

    @staticmethod
    def _latch(counter: _Counter, now: int) -> list[int]:
        value = counter.value(now)
        if counter.rw == RW_LSB:
            return [value & 0xFF]
        if counter.rw == RW_MSB:
            return [value >> 8]
        return [value & 0xFF, value >> 8]

    @staticmethod
    def _status(counter: _Counter, now: int) -> int:
        return (
            (STATUS_OUT if counter.output(now) else 0)
            | (STATUS_NULL_COUNT if counter.null_count else 0)
            | counter.rw << 4
            | counter.mode << 1
            | int(counter.bcd)
        )

    def _write_count(self, counter: _Counter, index: int, value: int) -> None:
        if counter.rw == RW_LSB:
            count = value
        elif counter.rw == RW_MSB:
            count = value << 8
        elif counter.write_low is None:
            counter.write_low = value
            if counter.mode == 0:
                counter.armed = False  # writing the first byte stops a mode-0 count
                if index == 0:
                    self._reschedule()
            return
        else:
            count = counter.write_low | value << 8
            counter.write_low = None
        counter.count = count or 0x10000
        counter.loaded_at = self.ticks()
        counter.armed = True
        counter.null_count = False
        if index == 0:
            self._reschedule()

    # -- interrupts ----------------------------------------------------------------------------

    def _reschedule(self) -> None:
        """Counter 0 changed: recompute the next edge and wake the timer thread (locked)."""
        self._next_irq = self._counters[0].next_edge(self.ticks())
        if self._thread is None and self._threaded and self._next_irq is not None and not self._closed:
            self._thread = threading.Thread(target=self._run, name=f"{self.id}-pit", daemon=True)
            self._thread.start()
        self._wake.notify()

    def poll(self) -> int:
        """Deliver the interrupt whose time has come, if any; returns edges delivered (0 or 1).
        Edges missed since the last poll are merged into one."""
        with self._lock:
            return self._poll_locked()

    def _poll_locked(self) -> int:
        due = self._next_irq
        if due is None or self._closed:
            return 0
        now = self.ticks()
        if now < due:
            return 0
        counter = self._counters[0]
        self._next_irq = counter.next_edge(now)
        if self._next_irq is not None and counter.mode in (2, 3):
            self.merged += (now - due) // counter.count
        if self._paused_at is not None:
            self._missed_edge = True
            return 0
        self.interrupts += 1
        if self._line is not None:
            self._line.trigger()
        return 1

    def _run(self) -> None:
        enter_thread(DEVICE, f"{self.id}-pit")
        with self._lock:
            while not self._closed:
                self._poll_locked()
                due = self._next_irq
                if due is None or self._paused_at is not None:
                    self._wake.wait()
                    continue
                delay = self._host_time(due) - self._clock()
                # A few microseconds late rather than early: tick counts are rounded down.
                self._wake.wait(max(delay, 0.0) + 5e-6)

    # -- lifecycle -----------------------------------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self.ticks()

    def resume(self) -> None:
        with self._lock:
            if self._paused_at is None:
                return
            # Time stood still while paused: move the epoch so the counters go on from there.
            paused_at, self._paused_at = self._paused_at, None
            self._epoch = self._clock() - paused_at * self.dilation / PIT_HZ
            if self._missed_edge:
                self._missed_edge = False
                self.interrupts += 1
                if self._line is not None:
                    self._line.trigger()
            self._wake.notify()

    def reset(self) -> None:
        with self._lock:
            self._counters = [_Counter() for _ in range(3)]
            self._next_irq = None
            self._missed_edge = False
            self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _COUNTER: ClassVar[dict[str, str]] = {"mode": "int", "rw": "int", "bcd": "bool", "count": "int",
                                          "loaded_at": "int", "armed": "bool", "null_count": "bool",
                                          "write_low": "int?", "latched": "ints", "status": "int?",
                                          "read_high": "bool"}

    def save_state(self) -> dict[str, Any]:
        """The three counters and the PIT's time (ticks) when the VM was paused: the restored
        PIT goes on from there, as after a resume."""
        with self._lock:
            return {"ticks": self._paused_at if self._paused_at is not None else self.ticks(),
                    "missed_edge": self._missed_edge,
                    "counters": [save_named(counter, self._COUNTER) for counter in self._counters]}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        counters, ticks = state.get("counters"), state.get("ticks")
        if not isinstance(counters, list) or len(counters) != 3 or not isinstance(ticks, int) or ticks < 0:
            raise StateError(f"{self.id}: expected three counters and a tick count")
        restored = []
        for index, saved in enumerate(counters):
            if not isinstance(saved, dict):
                raise StateError(f"{self.id}.counters[{index}]: expected an object")
            counter = _Counter()
            restore_fields(counter, saved, self._COUNTER, f"{self.id}.counters[{index}]")
            restored.append(counter)
        with self._lock:
            self._counters = restored
            self._paused_at = ticks  # resume() moves the epoch so that time goes on from here
            self._missed_edge = bool(state.get("missed_edge"))
            self._next_irq = self._counters[0].next_edge(ticks) if self._counters[0].armed else None
            if self._next_irq is not None and self._threaded and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self.id}-pit", daemon=True)
                self._thread.start()
            self._wake.notify()

    def counters(self) -> Mapping[str, int]:
        return {"interrupts": self.interrupts, "merged": self.merged, **super().counters()}


def create(ctx: DeviceContext, request: DeviceRequest) -> I8254:
    """``I8254Type.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    line = ctx.interrupt_line(request.irq)[1] if request.irq is not None else None
    return I8254(request.id, line, dilation=_dilation(request.config))


def _dilation(config: Any) -> int:
    if config is None:
        return 1
    value = config.get("dilation", 1) if isinstance(config, Mapping) else getattr(config, "dilation", 1)
    return int(value or 1)
