"""The ACPI Generic Event Device's notification register (device type ``acpi-ged``), as Cloud
Hypervisor's ``AcpiGedDevice``: one byte, placed in MMIO by the architecture.

The VMM sets a bit and raises the GED's interrupt (edge); the guest's ``_EVT`` method (in the
DSDT, ``\\_SB_.GED_`` with ``ACPI0013``, which calls ``\\_SB_.GEC_.ESCN``) reads the byte, which
clears it, and acts on each bit. The bits are CH's ``AcpiNotificationFlags``:

    0x01  CPU devices changed        0x02  memory devices changed
    0x04  PCI devices changed        0x08  power button pressed (Notify(\\_SB_.PWRB, 0x80))

vmmkit uses the power button (``vm.power-button``, :meth:`AcpiGed.press_power_button`),
vCPU hotplug (:meth:`AcpiGed.notify_cpu_devices_changed`: ``ESCN`` calls ``\\_SB_.CPUS.CSCN``,
see :mod:`vmmkit.cpu_hotplug`), memory hotplug (:meth:`AcpiGed.notify_memory_devices_changed`: ``ESCN`` calls
``\\_SB_.MHPC.MSCN``, :mod:`vmmkit.acpi.memory_hotplug`, when the layout has hotplug RAM) and
PCI hotplug (:meth:`AcpiGed.notify_pci_devices_changed`: ``ESCN`` calls ``\\_SB_.PHPR.PSCN``,
the register block of :mod:`vmmkit.pci.hotplug`, which the device manager places wherever the
layout has ``pci_hotplug``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.acpi import aml
from vmmkit.device import DeviceContext, DeviceRequest, PlacedDevice
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.state import restore_fields, save_named
from vmmkit_devices._regs import ByteRegisters
from vmmkit_devices.device_types import AcpiGedType as AcpiGedType  # declared there, re-exported

if TYPE_CHECKING:
    from vmmkit.firmware import AcpiScope

log = get_logger()

CPU_DEVICES_CHANGED = 0x01
MEMORY_DEVICES_CHANGED = 0x02
PCI_DEVICES_CHANGED = 0x04
POWER_BUTTON_CHANGED = 0x08
#: Notify value of a power button: "the power button was pressed" (ACPI 6.5, 5.6.6).
NOTIFY_POWER_BUTTON = 0x80
#: Bytes of MMIO the register takes (CH's ``GED_DEVICE_ACPI_SIZE``).
GED_SIZE = 1


class AcpiGed(ByteRegisters):
    """The notification register; ``interrupt`` is the GED's line (``None``: polled only)."""

    kind: ClassVar[str] = "acpi-ged"
    length: ClassVar[int] = GED_SIZE
    handles_power_button: ClassVar[bool] = True
    handles_pci_hotplug_notification: ClassVar[bool] = True
    handles_memory_hotplug_notification: ClassVar[bool] = True
    handles_cpu_hotplug_notification: ClassVar[bool] = True

    def __init__(self, device_id: str, interrupt: InterruptLine | None) -> None:
        super().__init__(device_id)
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._pending = 0
        self.notifications = 0
        self.power_button_presses = 0
        self.pci_notifications = 0
        self.memory_notifications = 0
        self.cpu_notifications = 0

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

    def notify_pci_devices_changed(self) -> None:
        """A PCI device was added, or the host asks for one's removal: the guest rescans."""
        self.pci_notifications += 1
        self.notify(PCI_DEVICES_CHANGED)

    def notify_memory_devices_changed(self) -> None:
        """Memory was plugged, or the host asks for some to be ejected: the guest rescans."""
        self.memory_notifications += 1
        self.notify(MEMORY_DEVICES_CHANGED)

    def notify_cpu_devices_changed(self) -> None:
        """A vCPU was added, or the host asks for one's removal: the guest rescans them."""
        self.cpu_notifications += 1
        self.notify(CPU_DEVICES_CHANGED)

    def read_byte(self, offset: int) -> int:
        with self._lock:
            value, self._pending = self._pending, 0
        return value

    def write_byte(self, offset: int, value: int) -> None:
        pass  # read-only, as CH's

    def reset(self) -> None:
        with self._lock:
            self._pending = 0

    # -- snapshots (vmmkit.state.Snapshottable) --------------------------------------------------

    state_version: ClassVar[int] = 1
    _STATE: ClassVar[dict[str, str]] = {"_pending": "int"}

    def save_state(self) -> dict[str, Any]:
        """The notifications the guest has not read yet."""
        with self._lock:
            return save_named(self, self._STATE)

    def restore_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            restore_fields(self, state, self._STATE, "acpi-ged")

    def counters(self) -> Mapping[str, int]:
        return {
            "notifications": self.notifications,
            "power_button_presses": self.power_button_presses,
            "pci_notifications": self.pci_notifications,
            "memory_notifications": self.memory_notifications,
            "cpu_notifications": self.cpu_notifications,
            **super().counters(),
        }

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """As Cloud Hypervisor's ``impl Aml for AcpiGedDevice``: ``\\_SB_.GEC_`` (PNP0A06)
        holds the notification byte (OperationRegion GDST, field GDAT) and the method ESCN,
        which reads it, on bit 0x01 calls ``\\_SB_.CPUS.CSCN`` (vCPU hotplug, when the layout
        has its registers, :mod:`vmmkit.cpu_hotplug`), on bit 0x04 calls ``\\_SB_.PHPR.PSCN``
        (PCI hotplug, when the layout has its registers) and on bit 0x08 does
        ``Notify(\\_SB_.PWRB, 0x80)``; ``\\_SB_.GED_`` (ACPI0013) has the interrupt in ``_CRS``
        and ``_EVT`` calling ESCN; ``\\_SB_.PWRB`` (PNP0C0C) is the power button. One GED per VM."""
        if placed.mmio is None or scope.next_index("acpi-ged") > 0:
            return
        base, size = placed.mmio
        cpu: list[aml.Term] = []
        if scope.layout.cpu_hotplug is not None:
            cpu = [
                aml.And(aml.Local(0), CPU_DEVICES_CHANGED, aml.Local(1)),
                aml.If(aml.LEqual(aml.Local(1), CPU_DEVICES_CHANGED), [aml.Call("\\_SB_.CPUS.CSCN")]),
            ]
        pci: list[aml.Term] = []
        if scope.layout.pci_hotplug is not None:
            pci = [
                aml.And(aml.Local(0), PCI_DEVICES_CHANGED, aml.Local(1)),
                aml.If(aml.LEqual(aml.Local(1), PCI_DEVICES_CHANGED), [aml.Call("\\_SB_.PHPR.PSCN")]),
            ]
        memory: list[aml.Term] = []
        if scope.layout.memory_hotplug is not None and scope.layout.memory_hotplug_registers is not None:
            memory = [
                aml.And(aml.Local(0), MEMORY_DEVICES_CHANGED, aml.Local(1)),
                aml.If(aml.LEqual(aml.Local(1), MEMORY_DEVICES_CHANGED), [aml.Call("\\_SB_.MHPC.MSCN")]),
            ]
        scan = aml.Method(
            "ESCN",
            0,
            [
                aml.Store(aml.Path("GDAT"), aml.Local(0)),
                *memory,
                *cpu,
                *pci,
                aml.And(aml.Local(0), POWER_BUTTON_CHANGED, aml.Local(1)),
                aml.If(
                    aml.LEqual(aml.Local(1), POWER_BUTTON_CHANGED),
                    [aml.Notify(aml.Path("\\_SB_.PWRB"), NOTIFY_POWER_BUTTON)],
                ),
            ],
            serialized=True,
        )
        controller = aml.Device(
            "GEC_",
            [
                aml.Name("_HID", aml.EisaId("PNP0A06")),
                aml.Name("_UID", "Generic Event Controller"),
                aml.Name("_CRS", aml.ResourceTemplate([aml.Memory32Fixed(base, size)])),
                aml.OpRegion("GDST", aml.SYSTEM_MEMORY, base, size),
                aml.Field("GDST", [("GDAT", 8)]),
                scan,
            ],
        )
        interrupts = [aml.Interrupt(placed.irq)] if placed.irq is not None else []
        ged = aml.Device(
            "GED_",
            [
                aml.Name("_HID", "ACPI0013"),
                aml.Name("_UID", 0),
                aml.Name("_CRS", aml.ResourceTemplate(interrupts)),
                aml.Method("_EVT", 1, [aml.Path("\\_SB_.GEC_.ESCN")], serialized=True),
            ],
        )
        button = aml.Device("PWRB", [aml.Name("_HID", aml.EisaId("PNP0C0C")), aml.Name("_UID", 0)])
        scope.add(controller, ged, button)


def create(ctx: DeviceContext, request: DeviceRequest) -> AcpiGed:
    """``AcpiGedType.create`` (declared in :mod:`vmmkit_devices.device_types`)."""
    line = ctx.interrupt_line(request.irq)[1] if request.irq is not None else None
    return AcpiGed(request.id, line)
