"""The Intel 6300ESB watchdog timer (device type ``i6300esb``, ``--watchdog``): a PCI function
(8086:25ab) that resets the VM when the guest stops petting it. Linux's ``i6300esb`` driver
(``drivers/watchdog/i6300esb.c``) and QEMU's model (``hw/watchdog/wdt_i6300esb.c``) are the
references; the register semantics follow QEMU's, which that driver is known to work with.

- PCI configuration space: ``0x60`` the configuration register (bit 5 set: *no* reboot on
  timeout; bit 2: 1 MHz instead of 1 kHz; bits 0-1 the stage-1 interrupt type), ``0x68`` the
  lock register (bit 0 lock until reset, bit 1 enable, bit 2 free-running).
- BAR 0, 16 bytes of MMIO: ``0x00`` / ``0x04`` the two stages' 20-bit preload values, ``0x0c``
  the reload register. Writing ``0x80`` then ``0x86`` to ``0x0c`` unlocks the next write to a
  preload or the reload register; bit 8 of a reload write restarts stage 1 (the "ping"), bit 9
  clears the timed-out flag, which reads back at bit 9 (and bit 12, as QEMU does for an old
  Linux bug) so the guest's driver reports ``WDIOF_CARDRESET`` after a watchdog reset.

Each stage lasts ``preload << 15`` (1 kHz) or ``preload << 5`` (1 MHz) ticks of a 33 MHz clock.
Stage 1's expiry would raise an interrupt; like QEMU, the model raises none (Linux disables it)
and goes on to stage 2, whose expiry resets the VM (CH's watchdog action), unless the guest
turned rebooting off. The stages are counted in the guest's time: where a host quirk slows the
guest's clocks (:attr:`vmmkit.hypervisor.Hypervisor.guest_clock_dilation`), they last as many
times longer in wall-clock time. The device model runs on its own countdown thread; every value the
guest writes is masked to the register's width, and any access outside the registers reads as
zero and is otherwise ignored.

Cloud Hypervisor's ``--watchdog`` is a virtio watchdog whose Linux driver is not upstream; the
6300ESB is what upstream Linux (and Windows) drive, so vmmkit's ``--watchdog`` is this device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.log import get_logger
from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import PciFunction
from vmmkit.sandbox import DEVICE, enter_thread
from vmmkit_devices.device_types import I6300EsbType as I6300EsbType  # declared there, re-exported

log = get_logger()

VENDOR_INTEL: Final = 0x8086
DEVICE_ESB_9: Final = 0x25AB
CLASS_SYSTEM: Final = 0x08
SUBCLASS_OTHER: Final = 0x80

CONFIG_REG: Final = 0x60  #: configuration register (16 bits)
LOCK_REG: Final = 0x68  #: lock register (8 bits)

TIMER1_REG: Final = 0x00
TIMER2_REG: Final = 0x04
RELOAD_REG: Final = 0x0C
BAR_SIZE: Final = 16

CONFIG_NO_REBOOT: Final = 1 << 5
CONFIG_FREQ_1MHZ: Final = 1 << 2
CONFIG_INT_TYPE: Final = 0x3
LOCK_LOCKED: Final = 1 << 0
LOCK_ENABLE: Final = 1 << 1
LOCK_FREE_RUN: Final = 1 << 2
RELOAD_PING: Final = 1 << 8
RELOAD_CLEAR_TIMEOUT: Final = (1 << 9) | (1 << 12)  # bit 9, and bit 12 for old Linux drivers
TIMED_OUT_FLAGS: Final = (1 << 9) | (1 << 12)
UNLOCK1: Final = 0x80
UNLOCK2: Final = 0x86

PRELOAD_MASK: Final = 0xFFFFF
PRELOAD_RESET: Final = 0xFFFFF
CLOCK_HZ: Final = 33_000_000


def stage_seconds(preload: int, *, one_mhz: bool) -> float:
    """How long one stage lasts for a preload value (33 MHz clock, prescaled by 2^15 or 2^5)."""
    return (preload << (5 if one_mhz else 15)) / CLOCK_HZ


class Countdown:
    """One timer on its own thread: :meth:`arm` (re)starts it, :meth:`cancel` stops it; when it
    runs out, ``expired`` is called on that thread (unless re-armed or cancelled first)."""

    def __init__(self, name: str, expired: Callable[[], None]) -> None:
        self._name = name
        self._expired = expired
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> None:
        with self._cond:
            if self._closed:
                return
            self._deadline = time.monotonic() + max(seconds, 0.0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _run(self) -> None:
        enter_thread(DEVICE, self._name)
        while True:
            with self._cond:
                while not self._closed and (self._deadline is None or time.monotonic() < self._deadline):
                    self._cond.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if self._closed:
                    return
                self._deadline = None
            self._expired()


class I6300Esb(PciFunction):
    kind: ClassVar[str] = "i6300esb"

    def __init__(self, name: str, *, reset_vm: Callable[[str], None],
                 emit: Callable[..., None] = lambda *_a, **_k: None, clock_dilation: int = 1) -> None:
        config = PciConfigSpace(vendor_id=VENDOR_INTEL, device_id=DEVICE_ESB_9, class_code=CLASS_SYSTEM,
                                subclass=SUBCLASS_OTHER)
        config.add_bar(PciBar(0, BAR_SIZE, BarKind.MEM32))
        super().__init__(name, config)
        self._reset_vm = reset_vm
        self._emit = emit
        #: The guest's clocks run this many times slower than wall-clock time (a host quirk):
        #: the stages are counted in guest time, so a guest petting on time is never reset.
        self._clock_dilation = max(1, clock_dilation)
        self._lock = threading.Lock()
        self._countdown = Countdown(f"wdt-{name}"[:15], self._stage_expired)
        #: Set when the watchdog reset the VM; survives the reset, cleared by the guest.
        self.timed_out = False
        self.expirations = 0
        self.pings = 0
        self._power_on()

    def _power_on(self) -> None:
        self.config_reg = 0  # reboot on timeout, 1 kHz, stage-1 interrupt type 0
        self.lock_reg = 0
        self.preload = [PRELOAD_RESET, PRELOAD_RESET]
        self.stage = 1
        self._unlock_state = 0
        self._countdown.cancel()

    # -- state the registers describe ----------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.lock_reg & LOCK_ENABLE)

    @property
    def reboot_enabled(self) -> bool:
        return not self.config_reg & CONFIG_NO_REBOOT

    def _start_stage(self, stage: int) -> None:
        """Count down ``stage`` (1 or 2) from its preload value, if the watchdog is enabled."""
        if not self.enabled:
            return
        self.stage = stage
        seconds = stage_seconds(self.preload[stage - 1], one_mhz=bool(self.config_reg & CONFIG_FREQ_1MHZ))
        seconds *= self._clock_dilation
        self._countdown.arm(seconds)
        log.debug("watchdog.stage", device=self.name, stage=stage, seconds=round(seconds, 3))

    def _stage_expired(self) -> None:
        with self._lock:
            if not self.enabled:
                return
            if self.stage == 1:
                self._start_stage(2)  # stage 1 would interrupt; the model raises none, as QEMU's
                return
            self.expirations += 1
            reboot = self.reboot_enabled
            if reboot:
                self.timed_out = True
            elif self.lock_reg & LOCK_FREE_RUN:
                self._start_stage(1)
        if reboot:
            log.warning("watchdog.expired", device=self.name, action="reset")
            self._emit("guest-watchdog-expired", id=self.name, action="reset")
            self._reset_vm("watchdog")

    # -- configuration space ---------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        value = super().config_read(offset, size)
        with self._lock:
            for index in range(size):
                byte = self._shadow_byte(offset + index)
                if byte is not None:
                    value = (value & ~(0xFF << (8 * index))) | (byte << (8 * index))
        return value

    def _shadow_byte(self, offset: int) -> int | None:
        if offset in (CONFIG_REG, CONFIG_REG + 1):
            return (self.config_reg >> (8 * (offset - CONFIG_REG))) & 0xFF
        if offset == LOCK_REG:
            return self.lock_reg
        return None

    def config_write(self, offset: int, size: int, value: int) -> None:
        shadowed = {CONFIG_REG, CONFIG_REG + 1, LOCK_REG}
        touched = [(offset + index, (value >> (8 * index)) & 0xFF) for index in range(size)]
        if not any(at in shadowed for at, _ in touched):
            super().config_write(offset, size, value)
            return
        with self._lock:
            for at, byte in touched:
                if at in (CONFIG_REG, CONFIG_REG + 1):
                    shift = 8 * (at - CONFIG_REG)
                    self.config_reg = (self.config_reg & ~(0xFF << shift)) | (byte << shift)
                    self.config_reg &= CONFIG_NO_REBOOT | CONFIG_FREQ_1MHZ | CONFIG_INT_TYPE
                elif at == LOCK_REG:
                    self._write_lock(byte)

    def _write_lock(self, value: int) -> None:
        if self.lock_reg & LOCK_LOCKED:
            return  # locked until the next reset
        was_enabled = self.enabled
        self.lock_reg = value & (LOCK_LOCKED | LOCK_ENABLE | LOCK_FREE_RUN)
        if self.enabled and not was_enabled:
            self._start_stage(1)
        elif not self.enabled:
            self._countdown.cancel()

    # -- BAR 0 -------------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != 0 or not 1 <= size <= 8 or not 0 <= offset < BAR_SIZE:
            return bytes(max(0, min(size, 8)))
        value = 0
        with self._lock:
            if offset == RELOAD_REG and size >= 2 and self.timed_out:
                value = TIMED_OUT_FLAGS
        return value.to_bytes(size, "little")

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != 0 or not 1 <= len(data) <= 8 or not 0 <= offset < BAR_SIZE:
            return
        value = int.from_bytes(data, "little")
        with self._lock:
            if offset == RELOAD_REG and value == UNLOCK1:
                self._unlock_state = 1
                return
            if offset == RELOAD_REG and value == UNLOCK2 and self._unlock_state == 1:
                self._unlock_state = 2
                return
            if self._unlock_state != 2:
                return
            self._unlock_state = 0  # one write per unlock
            if offset == RELOAD_REG and len(data) >= 2:
                if value & RELOAD_PING:
                    self.pings += 1
                    self._start_stage(1)
                if value & RELOAD_CLEAR_TIMEOUT:
                    self.timed_out = False
            elif offset in (TIMER1_REG, TIMER2_REG) and len(data) == 4:
                self.preload[offset // 4] = value & PRELOAD_MASK

    # -- lifecycle ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """A VM reset stops the timer and restores the power-on registers; the timed-out flag
        stays, so the guest's driver can tell a watchdog reset."""
        super().reset()
        with self._lock:
            self._power_on()

    def counters(self) -> Mapping[str, int]:
        return {"expirations": self.expirations, "pings": self.pings, "timed_out": int(self.timed_out)}

    def placement_properties(self) -> Mapping[str, Any]:
        return {"model": "i6300esb"}

    def close(self) -> None:
        self._countdown.close()


def create(ctx: DeviceContext, request: DeviceRequest) -> I6300Esb:
    """``I6300EsbType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    emit: Any = getattr(ctx, "emit_event", None) or (lambda *_args, **_kwargs: None)
    dilation = int(getattr(ctx, "guest_clock_dilation", 1))
    return I6300Esb(request.id, reset_vm=ctx.request_reset, emit=emit, clock_dilation=dilation)
