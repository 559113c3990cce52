"""The pvpanic device (device type ``pvpanic``): QEMU's ISA pvpanic at I/O port 0x505 (ACPI
``QEMU0001``), which Linux's pvpanic driver writes when the guest panics.

Reads return the events supported (bit 0 PANICKED, bit 1 CRASH_LOADED); a write of those
bits becomes a ``guest-panic`` event (the event monitor's ``{"source": "guest", "event":
"panic"}``) and a warning in the log. The guest keeps running (a panicking Linux then
reboots or halts as its ``panic=`` parameter says).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.acpi import aml
from vmmkit.device import Device, DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.log import get_logger
from vmmkit_devices._regs import MAX_ACCESS, open_bus
from vmmkit_devices.device_types import PvPanicType as PvPanicType  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

PANICKED = 1 << 0
CRASH_LOADED = 1 << 1
SUPPORTED = PANICKED | CRASH_LOADED


class PvPanic(Device):
    kind: ClassVar[str] = "pvpanic"

    def __init__(self, device_id: str, emit: Callable[..., None]) -> None:
        super().__init__(device_id)
        self._emit = emit
        self.panics = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or not 1 <= size <= MAX_ACCESS:
            return open_bus(size)
        return bytes([SUPPORTED]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not 1 <= len(data) <= MAX_ACCESS:
            return
        events = data[0] & SUPPORTED
        if events:
            self.panics += 1
            kind = "panicked" if events & PANICKED else "crash-loaded"
            log.warning("guest.panic", device=self.id, kind=kind)
            self._emit("guest-panic", kind=kind)

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """Nothing: reads return the fixed capability bits."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        pass

    def counters(self) -> Mapping[str, int]:
        return {"panics": self.panics}

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """``QEMU0001`` with its port, as QEMU's pvpanic-isa (Linux's ``pvpanic-mmio``/ACPI
        driver finds it there)."""
        index = scope.next_index("pvpanic")
        scope.add(aml.simple_device(f"PEV{index:X}", "QEMU0001", index, aml.io_ports(placed.pio)))


def create(ctx: DeviceContext, request: DeviceRequest) -> PvPanic:
    """``PvPanicType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    emit: Any = getattr(ctx, "emit_event", None) or (lambda *_args, **_kwargs: None)
    return PvPanic(request.id, emit)
