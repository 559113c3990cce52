"""The MC146818 CMOS RTC (device type ``rtc-cmos``) at ports 0x70 (index) / 0x71 (data).

- Time registers (seconds, minutes, hours, day of week, day of month, month, year, and the
  century at 0x32, which ACPI's FADT names) follow the host's UTC clock plus an offset; a guest
  that sets the time (with or without register B's SET bit) changes only that offset.
- Register A: UIP is set during the last 244 µs of each second (as on the chip, so code that
  waits for UIP to fall, or for it to rise, finishes; it is never stuck). It stays clear while
  SET is on or the divider is held in reset (DV = 11x).
- Register B: 24-hour BCD by default; the guest may switch to binary (DM) and 12-hour mode,
  and the time registers follow at once.
- Register C: UF (update ended) when a second boundary passed since the last read of C, AF
  when the alarm registers (seconds, minutes, hours; 0xc0-0xff is "any") matched at that
  boundary; read clears. Register D: VRT (valid RAM and time) always set.
- Interrupts, when the device has a line (``DeviceRequest.irq``, IRQ 8 on a PC): update-ended
  and alarm interrupts (UIE, AIE), from a timer thread that runs only while one of them is
  enabled, as an edge when IRQF rises (reading C re-arms it). ``hwclock`` waits for the
  update interrupt when the RTC has an IRQ. Periodic interrupts (PIE) are not emulated: PF is
  never set.
- 114 bytes of NVRAM (0x0e-0x7f; 0x32 is the century), plus the alarm registers, kept across
  VM resets like battery-backed RAM. The architecture may pass the RAM sizes firmware reads
  from CMOS (``mem_below_4g``, ``mem_above_4g`` in ``DeviceRequest.config``).

Bit 7 of a write to 0x70 masks NMIs on a PC; it is remembered (:attr:`CmosRtc.nmi_masked`) and
has no other effect. Port 0x70 reads as 0xff (it is write-only).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.acpi import aml
from vmmkit.device import DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.sandbox import DEVICE, enter_thread
from vmmkit.state import StateError, restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import CmosRtcType as CmosRtcType  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

INDEX_PORT = 0
DATA_PORT = 1

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DV_MASK = 0x70
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
B_DEFAULT = B_24H
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80

#: How long before each second boundary UIP is set (8 cycles of the 32.768 kHz clock).
UIP_WINDOW = 244e-6
NVRAM_SIZE = 128 - 0x0E


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    high, low = value >> 4, value & 0x0F
    if high > 9 or low > 9:
        raise ValueError(f"{value:#04x} is not BCD")
    return high * 10 + low


class CmosRtc(ByteRegisters):
    """The RTC and its CMOS RAM. ``clock`` returns the host's time in seconds since the epoch
    (tests pass their own)."""

    kind: ClassVar[str] = "rtc-cmos"
    length: ClassVar[int] = 2

    def __init__(
        self,
        device_id: str,
        *,
        clock: Callable[[], float] = time.time,
        mem_below_4g: int = 0,
        mem_above_4g: int = 0,
        line: InterruptLine | None = None,
    ) -> None:
        super().__init__(device_id)
        self._clock = clock
        self._lock = threading.Lock()
        #: Guest time minus host time, in seconds (the guest's clock setting).
        self.offset = 0.0
        self._ram = bytearray(128)
        self._a = A_DEFAULT
        self._b = B_DEFAULT
        self._latch: dict[int, int] = {}
        self._index = 0
        self.nmi_masked = False
        self._last_update = math.floor(self._now())
        self._flags = 0  # register C
        self._line = line
        self._ticker: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._paused = False
        self._missed_edge = False
        self.time_sets = 0
        self.interrupts = 0
        if mem_below_4g or mem_above_4g:
            self._store_memory_sizes(mem_below_4g, mem_above_4g)

    def _store_memory_sizes(self, below: int, above: int) -> None:
        """The sizes PC firmware reads from CMOS (CH's and QEMU's layout)."""
        ram = self._ram
        ram[0x15], ram[0x16] = 0x80, 0x02  # 640 KiB of base memory
        extended_kib = min(0xFFFF, max(0, below - 0x100000) // 1024)
        ram[0x17] = ram[0x30] = extended_kib & 0xFF
        ram[0x18] = ram[0x31] = extended_kib >> 8
        above_16m = min(0xFFFF, max(0, below - 16 * 1024 * 1024) // 0x10000)
        ram[0x34], ram[0x35] = above_16m & 0xFF, above_16m >> 8
        high = min(0xFFFFFF, max(0, above) // 0x10000)
        ram[0x5B], ram[0x5C], ram[0x5D] = high & 0xFF, (high >> 8) & 0xFF, high >> 16

    # -- the clock ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() + self.offset

    def _encode(self, value: int) -> int:
        return value if self._b & B_DM_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._b & B_DM_BINARY else _from_bcd(value)

    def _time_registers(self, now: float) -> dict[int, int]:
        """The time registers as the guest reads them at ``now``, in the current format."""
        tm = time.gmtime(math.floor(now))
        hour = tm.tm_hour
        if self._b & B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        return {
            SECONDS: self._encode(min(tm.tm_sec, 59)),
            MINUTES: self._encode(tm.tm_min),
            HOURS: hours,
            DAY_OF_WEEK: self._encode((tm.tm_wday + 1) % 7 + 1),
            DAY_OF_MONTH: self._encode(tm.tm_mday),
            MONTH: self._encode(tm.tm_mon),
            YEAR: self._encode(tm.tm_year % 100),
            CENTURY: self._encode(tm.tm_year // 100),
        }

    def _set_time(self, registers: Mapping[int, int]) -> None:
        """Make the guest's clock read ``registers`` now; invalid dates are ignored."""
        import calendar  # with datetime, only when a guest sets the clock (start-up cost)
        import datetime

        try:
            if self._b & B_24H:
                hour = self._decode(registers[HOURS])
            else:
                raw = registers[HOURS]
                hour12 = self._decode(raw & 0x7F)
                if not 1 <= hour12 <= 12:
                    raise ValueError(f"hour {hour12} in 12-hour mode")
                hour = hour12 % 12 + (12 if raw & 0x80 else 0)
            when = datetime.datetime(
                self._decode(registers[CENTURY]) * 100 + self._decode(registers[YEAR]),
                self._decode(registers[MONTH]),
                self._decode(registers[DAY_OF_MONTH]),
                hour,
                self._decode(registers[MINUTES]),
                self._decode(registers[SECONDS]),
            )
        except ValueError as exc:
            log.debug("rtc.invalid_time", device=self.id, reason=str(exc))
            return
        self.offset = calendar.timegm(when.timetuple()) - self._clock()
        self._last_update = math.floor(self._now())  # the next update is a second away
        self.time_sets += 1

    def _uip(self, now: float) -> bool:
        if self._b & B_SET or (self._a & A_DV_MASK) >> 4 >= 6:
            return False
        return now - math.floor(now) >= 1.0 - UIP_WINDOW

    # -- registers ---------------------------------------------------------------------------

    def read_byte(self, offset: int) -> int:
        if offset == INDEX_PORT:
            return 0xFF
        with self._lock:
            return self._read_register(self._index)

    def write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == INDEX_PORT:
                self._index = value & 0x7F
                self.nmi_masked = bool(value & 0x80)
            else:
                self._write_register(self._index, value)

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            if self._b & B_SET:
                return self._latch.get(index, 0)
            return self._time_registers(self._now())[index]
        if index == REG_A:
            return self._a | (A_UIP if self._uip(self._now()) else 0)
        if index == REG_B:
            return self._b
        if index == REG_C:
            self._catch_up()
            flags, self._flags = self._flags, 0
            return flags
        if index == REG_D:
            return D_VRT
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            if self._b & B_SET:
                self._latch[index] = value
            else:
                registers = self._time_registers(self._now())
                registers[index] = value
                self._set_time(registers)
        elif index == REG_A:
            self._a = value & ~A_UIP & 0xFF
        elif index == REG_B:
            was_set = self._b & B_SET
            if value & B_SET:
                value &= ~B_UIE  # SET clears UIE on the chip
                self._catch_up()  # updates stop now
            if value & B_SET and not was_set:
                self._b = value
                self._latch = self._time_registers(self._now())
            elif was_set and not value & B_SET:
                self._set_time(self._latch)
                self._b = value
                self._latch = {}
            else:
                self._b = value
            self._raise(0)  # a newly enabled source with its flag already set interrupts
            self._arm()
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self._ram[index] = value

    # -- update cycles and interrupts ----------------------------------------------------------

    def _catch_up(self) -> None:
        """Account for the update cycle (second boundary) passed since the last one seen."""
        if self._b & B_SET:
            return
        now = self._now()
        second = math.floor(now)
        if second == self._last_update:
            return
        self._last_update = second
        flags = C_UF
        registers = self._time_registers(now)
        for reg, alarm in ((SECONDS, SECONDS_ALARM), (MINUTES, MINUTES_ALARM), (HOURS, HOURS_ALARM)):
            value = self._ram[alarm]
            if value & 0xC0 != 0xC0 and value != registers[reg]:
                break
        else:
            flags |= C_AF
        self._raise(flags)

    def _raise(self, flags: int) -> None:
        """Set register C ``flags``; an edge on the line when IRQF rises."""
        was = self._flags & C_IRQF
        self._flags |= flags
        if self._flags & C_UF and self._b & B_UIE or self._flags & C_AF and self._b & B_AIE:
            self._flags |= C_IRQF
        if self._flags & C_IRQF and not was and self._line is not None:
            if self._paused:
                self._missed_edge = True
            else:
                self.interrupts += 1
                self._line.trigger()

    def _interrupts_wanted(self) -> bool:
        return (
            self._line is not None
            and not self._closed
            and bool(self._b & (B_UIE | B_AIE))
            and not self._b & B_SET
        )

    def _arm(self) -> None:
        """Start the timer thread when an interrupt source is enabled (locked)."""
        if self._interrupts_wanted() and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name=f"{self.id}-rtc", daemon=True)
            self._ticker.start()
        self._wake.set()

    def _tick(self) -> None:
        enter_thread(DEVICE, f"{self.id}-rtc")
        while True:
            with self._lock:
                if not self._interrupts_wanted():
                    self._ticker = None
                    return
                self._catch_up()
                now = self._now()
                delay = math.floor(now) + 1 - now + 1e-4
                self._wake.clear()
            self._wake.wait(delay)

    # -- lifecycle ---------------------------------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            if self._missed_edge and self._line is not None:
                self._missed_edge = False
                self.interrupts += 1
                self._line.trigger()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ticker = self._ticker
            self._wake.set()
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout=5)

    def reset(self) -> None:
        """A system reset: the time, its format and the NVRAM survive (battery-backed); the
        interrupt enables and a half-done time setting do not."""
        with self._lock:
            if self._b & B_SET:
                self._set_time(self._latch)
                self._latch = {}
            self._b &= B_DM_BINARY | B_24H | B_DSE
            self._flags = 0
            self._index = 0
            self.nmi_masked = False
            self._wake.set()  # the timer thread, if any, stops

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {"_ram": "bytes", "_a": "int", "_b": "int", "_index": "int",
                                        "nmi_masked": "bool", "_flags": "int", "offset": "float"}

    def save_state(self) -> dict[str, Any]:
        """CMOS RAM, the control registers and the guest's offset from host time (the RTC
        keeps following the host's clock after a restore, as a battery-backed one would)."""
        with self._lock:
            return {**save_named(self, self._STATE), "latch": {str(k): v for k, v in self._latch.items()}}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        latch = state.get("latch")
        if not isinstance(latch, dict) or not all(k.isdigit() and isinstance(v, int) for k, v in latch.items()):
            raise StateError(f"{self.id}.latch: expected an object of register values")
        with self._lock:
            restore_fields(self, state, self._STATE, self.id)
            self._latch = {int(k): v for k, v in latch.items()}
            self._last_update = math.floor(self._now())
            self._arm()

    def counters(self) -> Mapping[str, int]:
        return {"time_sets": self.time_sets, "interrupts": self.interrupts, **super().counters()}

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``PNP0B00`` (an AT-compatible RTC), ``\\_SB_.RTCn``."""
        index = scope.next_index("rtc-cmos")
        scope.add(aml.simple_device(f"RTC{index:X}", aml.EisaId("PNP0B00"), index,
                                    [*aml.io_ports(placed.pio), *aml.legacy_irq(placed.irq)]))


def create(ctx: DeviceContext, request: DeviceRequest) -> CmosRtc:
    """``CmosRtcType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    line = ctx.interrupt_line(request.irq)[1] if request.irq is not None else None
    return CmosRtc(
        request.id,
        mem_below_4g=_option(request.config, "mem_below_4g"),
        mem_above_4g=_option(request.config, "mem_above_4g"),
        line=line,
    )


def _option(config: Any, name: str) -> int:
    if config is None:
        return 0
    value = config.get(name, 0) if isinstance(config, Mapping) else getattr(config, name, 0)
    return int(value or 0)
