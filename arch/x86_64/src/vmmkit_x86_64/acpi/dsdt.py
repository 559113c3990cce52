"""The DSDT body: one ACPI device per placed device whose kind we know, plus ``_S5_``.

Kinds described (``PlacedDevice.kind``)::

    serial-16550  PNP0501  IO + IRQNoFlags                    \\_SB_.COMn
    rtc-cmos      PNP0B00  IO + IRQNoFlags                    \\_SB_.RTCn
    i8042         PNP0303  IO data port + IO command port + IRQNoFlags (keyboard)  \\_SB_.PS2K
    virtio-mmio   LNRO0005 Memory32Fixed + Interrupt (edge, active high)          \\_SB_.Vnnn
    pci-host      PNP0A08 (_CID PNP0A03) root bridge: _SEG, _BBN, _CRS with the bus range,
                  config ports, the I/O, MMIO32 and MMIO64 windows; _PRT for INTx  \\_SB_.PCIn
                  (+ a PNP0C02 motherboard resource claiming the ECAM window when there is one)
    acpi-ged      as Cloud Hypervisor's AcpiGedDevice: \\_SB_.GEC_ (PNP0A06) holds the MMIO
                  notification byte (OperationRegion GDST, field GDAT) and the method ESCN,
                  which reads it and on bit 0x08 does Notify(\\_SB_.PWRB, 0x80);
                  \\_SB_.GED_ (ACPI0013) has the interrupt in _CRS and _EVT calling ESCN;
                  \\_SB_.PWRB (PNP0C0C) is the power button

Unknown kinds are not described.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from vmmkit.arch import MemoryLayout
from vmmkit.device import PlacedDevice
from vmmkit.memory import MemoryRange
from vmmkit_x86_64.acpi import aml
from vmmkit_x86_64.acpi.aml import (
    Device,
    EisaId,
    Interrupt,
    Io,
    IrqNoFlags,
    Memory32Fixed,
    Name,
    Package,
    ResourceTemplate,
    Scope,
)

#: ``_S5_``: SLP_TYPa = 5, what a guest writes to the sleep control register as ``5 << 2``.
S5_SLEEP_TYPE: Final = 5
STA_PRESENT: Final = 0x0F  #: present, enabled, shown in UI, functioning


def dsdt_aml(devices: Sequence[PlacedDevice], layout: MemoryLayout) -> bytes:
    """The AML of the DSDT describing ``devices``."""
    children: list[aml.Term] = []
    counters: dict[str, int] = {}
    for placed in devices:
        describe = _DESCRIBERS.get(placed.kind)
        if describe is None:
            continue
        index = counters.get(placed.kind, 0)
        counters[placed.kind] = index + 1
        children.extend(describe(placed, index, layout))
    body: list[aml.Term] = [Name("_S5_", Package([S5_SLEEP_TYPE, 0, 0, 0])), Scope("\\_SB_", children)]
    return aml.encode_all(body)


def _device(
    name: str, hid: aml.Term, uid: int, resources: Sequence[aml.AmlObject], *extra: aml.Term
) -> Device:
    return Device(
        name,
        [
            Name("_HID", hid),
            *extra,
            Name("_UID", uid),
            Name("_STA", STA_PRESENT),
            Name("_CRS", ResourceTemplate(resources)),
        ],
    )


def _irq(placed: PlacedDevice) -> list[aml.AmlObject]:
    if placed.irq is None:
        return []
    if placed.irq < 16:
        return [IrqNoFlags(placed.irq)]
    return [Interrupt(placed.irq)]


def _pio(placed: PlacedDevice) -> list[aml.AmlObject]:
    if placed.pio is None:
        return []
    base, size = placed.pio
    return [Io(base, base, 1, size)]


def _serial(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    return [
        _device(
            f"COM{index + 1}" if index < 9 else f"CO{index + 1:02X}",
            EisaId("PNP0501"),
            index + 1,
            [*_pio(placed), *_irq(placed)],
        )
    ]


def _rtc(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    return [_device(f"RTC{index:X}", EisaId("PNP0B00"), index, [*_pio(placed), *_irq(placed)])]


def _pvpanic(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    return [_device(f"PEV{index:X}", "QEMU0001", index, [*_pio(placed)])]


def _i8042(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    if placed.pio is None:
        return []
    base, size = placed.pio
    ports: list[aml.AmlObject] = [Io(base, base, 1, 1)]
    if size > 4:  # the command/status port, 4 above the data port (0x60 / 0x64)
        ports.append(Io(base + 4, base + 4, 1, 1))
    return [
        _device("PS2K" if index == 0 else f"PS2{index:X}", EisaId("PNP0303"), index, [*ports, *_irq(placed)])
    ]


def _virtio_mmio(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    if placed.mmio is None:
        return []
    base, size = placed.mmio
    resources: list[aml.AmlObject] = [Memory32Fixed(base, size)]
    if placed.irq is not None:
        resources.append(Interrupt(placed.irq, edge=True, active_low=False))
    return [_device(f"V{index:03X}", "LNRO0005", index, resources)]


def _window(props: dict[str, Any], key: str, fallback: MemoryRange | None) -> tuple[int, int] | None:
    """A ``(start, size)`` window from the host's properties, else the layout's."""
    if key in props:
        value = props[key]
        return None if value is None else (int(value[0]), int(value[1]))
    return None if fallback is None else (fallback.start, fallback.size)


def _pci_host(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    """A PCI Express root bridge. ``properties`` (see :func:`vmmkit.pci.host.host_properties`):
    ``segment``, ``bus_range``, the ``io`` / ``mmio32`` / ``mmio64`` / ``ecam`` windows as
    ``(start, size)`` (default: the layout's) and ``intx`` routes ``(slot, pin, gsi)``."""
    props: dict[str, Any] = dict(placed.properties)
    segment = int(props.get("segment", index))
    first_bus, last_bus = props.get("bus_range", (0, 255))
    resources: list[aml.AmlObject] = [aml.word_bus_number(first_bus, last_bus)]
    if placed.pio is not None:
        base, size = placed.pio
        resources.append(Io(base, base, 1, size))
    io = _window(props, "io", layout.pio)
    if io is not None:
        resources.append(aml.word_io(io[0], io[0] + io[1] - 1))
    mmio32 = _window(props, "mmio32", layout.pci_mmio32)
    if mmio32 is not None:
        resources.append(aml.dword_memory(mmio32[0], mmio32[0] + mmio32[1] - 1))
    mmio64 = _window(props, "mmio64", layout.pci_mmio64)
    if mmio64 is not None:
        resources.append(aml.qword_memory(mmio64[0], mmio64[0] + mmio64[1] - 1))
    extra: list[aml.Term] = [
        Name("_CID", EisaId("PNP0A03")),
        Name("_SEG", segment),
        Name("_BBN", first_bus),
    ]
    routes = props.get("intx") or ()
    if routes:
        # _PRT entries: {address (slot << 16 | any function), pin (0 = INTA), source 0 (a GSI), GSI};
        # the OS makes such lines level-triggered, active low, as PCI INTx is.
        extra.append(
            Name(
                "_PRT",
                Package([Package([(slot << 16) | 0xFFFF, pin - 1, 0, gsi]) for slot, pin, gsi in routes]),
            )
        )
    name = "PCI0" if segment == 0 else f"PC{segment:02X}"
    out: list[aml.Term] = [_device(name, EisaId("PNP0A08"), segment, resources, *extra)]
    ecam = _window(props, "ecam", layout.pci_ecam)
    if ecam is not None and index == 0:
        # Linux accepts an MCFG area only if firmware also reserves it (here and in the e820).
        out.append(_device("MBRD", EisaId("PNP0C02"), 0, [Memory32Fixed(ecam[0], ecam[1])]))
    return out


#: The GED notification bit of the power button (CH's ``POWER_BUTTON_CHANGED``).
GED_POWER_BUTTON: Final = 0x08
NOTIFY_DEVICE_CHECK_POWER_BUTTON: Final = 0x80  #: "the power button was pressed"


def _acpi_ged(placed: PlacedDevice, index: int, layout: MemoryLayout) -> list[aml.Term]:
    if placed.mmio is None or index > 0:
        return []
    base, size = placed.mmio
    scan = aml.Method(
        "ESCN",
        0,
        [
            aml.Store(aml.Path("GDAT"), aml.Local(0)),
            aml.And(aml.Local(0), GED_POWER_BUTTON, aml.Local(1)),
            aml.If(
                aml.LEqual(aml.Local(1), GED_POWER_BUTTON),
                [aml.Notify(aml.Path("\\_SB_.PWRB"), NOTIFY_DEVICE_CHECK_POWER_BUTTON)],
            ),
        ],
        serialized=True,
    )
    controller = Device(
        "GEC_",
        [
            Name("_HID", EisaId("PNP0A06")),
            Name("_UID", "Generic Event Controller"),
            Name("_CRS", ResourceTemplate([Memory32Fixed(base, size)])),
            aml.OpRegion("GDST", aml.SYSTEM_MEMORY, base, size),
            aml.Field("GDST", [("GDAT", 8)]),
            scan,
        ],
    )
    ged = Device(
        "GED_",
        [
            Name("_HID", "ACPI0013"),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate([Interrupt(placed.irq)] if placed.irq is not None else [])),
            aml.Method("_EVT", 1, [aml.Path("\\_SB_.GEC_.ESCN")], serialized=True),
        ],
    )
    button = Device("PWRB", [Name("_HID", EisaId("PNP0C0C")), Name("_UID", 0)])
    return [controller, ged, button]


_DESCRIBERS: Final[dict[str, Callable[[PlacedDevice, int, MemoryLayout], list[aml.Term]]]] = {
    "serial-16550": _serial,
    "rtc-cmos": _rtc,
    "i8042": _i8042,
    "virtio-mmio": _virtio_mmio,
    "pci-host": _pci_host,
    "acpi-ged": _acpi_ged,
    "pvpanic": _pvpanic,
}
