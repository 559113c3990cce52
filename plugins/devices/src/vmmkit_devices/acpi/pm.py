"""ACPI hardware-reduced sleep and reset registers (device type ``acpi-pm``), at (0x600, 8).

The registers a hardware-reduced FADT points at (8-bit each):

- offset 0, SLEEP_CONTROL_REG: writing SLP_EN (bit 5) with SLP_TYP (bits 2-4) = 5, the value
  the DSDT's ``_S5`` package must give, powers the machine off
  (``request_shutdown("guest-poweroff")``). Other sleep types are not supported: the guest is
  woken at once (WAK_STS set) rather than left waiting for a wake-up that never comes.
- offset 1, SLEEP_STATUS_REG: WAK_STS (bit 7), write 1 to clear.
- offset 4, RESET_REG: writing 0x01 (the FADT's RESET_VALUE) resets the machine
  (``request_reset("acpi-reset")``).

The power button will come from an ACPI GED device (its own module in this package).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.log import get_logger
from vmmkit.state import restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import AcpiPmType as AcpiPmType  # declared there, re-exported

log = get_logger()

SLEEP_CONTROL = 0
SLEEP_STATUS = 1
RESET = 4

SLP_EN = 0x20
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x07
#: SLP_TYP of S5 (soft off), as the DSDT's ``_S5`` says.
S5_SLP_TYP = 5
WAK_STS = 0x80
#: RESET_VALUE of the FADT.
RESET_VALUE = 0x01


class AcpiPm(ByteRegisters):
    """The registers; ``request_shutdown`` / ``request_reset`` are the machine's callbacks."""

    kind: ClassVar[str] = "acpi-pm"
    length: ClassVar[int] = 8

    def __init__(
        self,
        device_id: str,
        request_shutdown: Callable[[str], None],
        request_reset: Callable[[str], None],
    ) -> None:
        super().__init__(device_id)
        self._request_shutdown = request_shutdown
        self._request_reset = request_reset
        self._lock = threading.Lock()
        self._sleep_control = 0
        self._sleep_status = 0
        self.poweroffs = 0
        self.resets = 0

    def read_byte(self, offset: int) -> int:
        if offset == SLEEP_CONTROL:
            return self._sleep_control
        if offset == SLEEP_STATUS:
            return self._sleep_status
        return 0

    def write_byte(self, offset: int, value: int) -> None:
        if offset == SLEEP_CONTROL:
            with self._lock:
                self._sleep_control = value & ~SLP_EN  # SLP_EN is write-only
                sleeping = bool(value & SLP_EN)
                if sleeping and (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK != S5_SLP_TYP:
                    self._sleep_status |= WAK_STS  # unsupported state: wake up at once
                    log.debug("acpi.sleep_unsupported", device=self.id, slp_typ=(value >> SLP_TYP_SHIFT) & 7)
                    return
            if sleeping:
                self.poweroffs += 1
                log.debug("acpi.poweroff", device=self.id)
                self._request_shutdown("guest-poweroff")
        elif offset == SLEEP_STATUS:
            with self._lock:
                self._sleep_status &= ~(value & WAK_STS)
        elif offset == RESET and value == RESET_VALUE:
            self.resets += 1
            log.debug("acpi.reset", device=self.id)
            self._request_reset("acpi-reset")

    def reset(self) -> None:
        with self._lock:
            self._sleep_control = 0
            self._sleep_status = 0

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {"_sleep_control": "int", "_sleep_status": "int"}

    def save_state(self) -> dict[str, Any]:
        with self._lock:
            return save_named(self, self._STATE)

    def restore_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            restore_fields(self, state, self._STATE, "acpi-pm")

    def counters(self) -> Mapping[str, int]:
        return {"poweroffs": self.poweroffs, "resets": self.resets, **super().counters()}


def create(ctx: DeviceContext, request: DeviceRequest) -> AcpiPm:
    """``AcpiPmType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    return AcpiPm(request.id, ctx.request_shutdown, ctx.request_reset)
