"""The ACPI Generic Event Device's notification register (device type ``acpi-ged``), as Cloud
Hypervisor's ``AcpiGedDevice``: one byte, placed in MMIO by the architecture.

The VMM sets a bit and raises the GED's interrupt (edge); the guest's ``_EVT`` method (in the
DSDT, ``\\_SB_.GED_`` with ``ACPI0013``, which calls ``\\_SB_.GEC_.ESCN``) reads the byte, which
clears it, and acts on each bit. The bits are CH's ``AcpiNotificationFlags``:

    0x01  CPU devices changed        0x02  memory devices changed
    0x04  PCI devices changed        0x08  power button pressed (Notify(\\_SB_.PWRB, 0x80))

vmmkit uses the power button (``vm.power-button``, :meth:`AcpiGed.press_power_button`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import ClassVar

from vmmkit.device import DeviceContext, DeviceRequest
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import AcpiGedType as AcpiGedType  # declared there, re-exported

log = get_logger()

CPU_DEVICES_CHANGED = 0x01
MEMORY_DEVICES_CHANGED = 0x02
PCI_DEVICES_CHANGED = 0x04
POWER_BUTTON_CHANGED = 0x08
#: Bytes of MMIO the register takes (CH's ``GED_DEVICE_ACPI_SIZE``).
GED_SIZE = 1


class AcpiGed(ByteRegisters):
    """The notification register; ``interrupt`` is the GED's line (``None``: polled only)."""

    kind: ClassVar[str] = "acpi-ged"
    length: ClassVar[int] = GED_SIZE

    def __init__(self, device_id: str, interrupt: InterruptLine | None) -> None:
        super().__init__(device_id)
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._pending = 0
        self.notifications = 0
        self.power_button_presses = 0

    def notify(self, flags: int) -> None:
        """Tell the guest that ``flags`` happened (from any thread)."""
        with self._lock:
            self._pending |= flags & 0xFF
            self.notifications += 1
        if self._interrupt is not None:
            self._interrupt.trigger()

    def press_power_button(self) -> None:
        """``vm.power-button``: the guest sees a power-button notification."""
        self.power_button_presses += 1
        log.debug("acpi.power_button", device=self.id)
        self.notify(POWER_BUTTON_CHANGED)

    def read_byte(self, offset: int) -> int:
        with self._lock:
            value, self._pending = self._pending, 0
        return value

    def write_byte(self, offset: int, value: int) -> None:
        pass  # read-only, as CH's

    def reset(self) -> None:
        with self._lock:
            self._pending = 0

    def counters(self) -> Mapping[str, int]:
        return {
            "notifications": self.notifications,
            "power_button_presses": self.power_button_presses,
            **super().counters(),
        }


def create(ctx: DeviceContext, request: DeviceRequest) -> AcpiGed:
    """``AcpiGedType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    line = ctx.interrupt_line(request.irq)[1] if request.irq is not None else None
    return AcpiGed(request.id, line)
