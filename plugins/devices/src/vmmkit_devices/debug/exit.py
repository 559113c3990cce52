"""QEMU's isa-debug-exit (device type ``debug-exit``), at (0xf4, 4) on x86.

A write of value ``v`` (any width, any offset in the range) records ``v & 0xff`` as the VMM's
exit status through ``DeviceContext.set_exit_status``; the last write wins.

Difference from QEMU: QEMU exits *immediately*, with status ``(v << 1) | 1``. vmmkit keeps the
guest running and exits with status ``v`` itself once the guest powers off (ACPI S5, or a stop
from outside), so a test guest writes its status and then powers off. Reads return 0, as in
QEMU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.device import Device, DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.log import get_logger
from vmmkit.state import StateError
from vmmkit_devices._regs import MAX_ACCESS, open_bus
from vmmkit_devices.device_types import DebugExitType as DebugExitType  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import FdtWriter

log = get_logger()


class DebugExit(Device):
    """Hands each written status to ``set_exit_status``."""

    kind: ClassVar[str] = "debug-exit"
    length: ClassVar[int] = 4

    def __init__(self, device_id: str, set_exit_status: Callable[[int], None]) -> None:
        super().__init__(device_id)
        self._set_exit_status = set_exit_status
        self.status: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        if not 0 <= offset < self.length or not 1 <= size <= MAX_ACCESS:
            return open_bus(size)
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if not 0 <= offset < self.length or not 1 <= len(data) <= MAX_ACCESS:
            return
        status = data[0]  # little-endian: the low byte of the value
        self.status = status
        log.debug("guest.exit_status", device=self.id, status=status)
        self._set_exit_status(status)

    def reset(self) -> None:
        self.status = None

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The exit status the guest wrote (the VMM's exit status once the guest powers off)."""
        return {"status": self.status}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        status = state.get("status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise StateError(f"{self.id}.status: expected an integer or null")
        self.status = status
        if status is not None:
            self._set_exit_status(status)

    def counters(self) -> Mapping[str, int]:
        return {"status": self.status} if self.status is not None else {}

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """``vmmkit,debug-exit``: where the AArch64 test guest writes its exit status."""
        if placed.mmio is None:
            return
        base, size = placed.mmio
        fdt.begin_node(f"debug-exit@{base:x}")
        fdt.property_strings("compatible", "vmmkit,debug-exit")
        fdt.property_reg(base, size)
        fdt.end_node()


def create(ctx: DeviceContext, request: DeviceRequest) -> DebugExit:
    """``DebugExitType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    return DebugExit(request.id, ctx.set_exit_status)
