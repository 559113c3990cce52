"""ACPI for x86-64 guests: the tables a VM gets and where they go.

:func:`build_acpi` lays the tables out from :data:`~vmmkit_x86_64.layout.RSDP_START` (the RSDP
first, so a guest scanning 0xe0000-0xfffff finds it) up to 1 MiB; :meth:`AcpiTables.write`
copies them into guest memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from vmmkit.arch import MemoryLayout
from vmmkit.device import PlacedDevice
from vmmkit.value import Value
from vmmkit_x86_64 import interrupts
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64 import platform as P
from vmmkit_x86_64.acpi import tables
from vmmkit_x86_64.acpi.dsdt import dsdt_aml

if TYPE_CHECKING:
    from vmmkit.memory import GuestMemory

TABLE_ALIGN: Final = 16


class AcpiTable(Value):
    """One table: its signature, guest-physical address and bytes."""

    __slots__ = ("signature", "address", "data")

    def __init__(self, signature: str, address: int, data: bytes) -> None:
        self.signature = signature
        self.address = address
        self.data = data

    def __repr__(self) -> str:
        return f"AcpiTable(signature={self.signature!r}, address={self.address:#x}, {len(self.data)} bytes)"


class AcpiTables(Value):
    """The tables a VM gets, RSDP first."""

    __slots__ = ("rsdp_address", "tables")

    def __init__(self, rsdp_address: int, tables: tuple[AcpiTable, ...]) -> None:
        self.rsdp_address = rsdp_address
        self.tables = tables

    def get(self, signature: str) -> AcpiTable:
        for table in self.tables:
            if table.signature == signature:
                return table
        raise KeyError(signature)

    @property
    def end(self) -> int:
        return max(t.address + len(t.data) for t in self.tables)

    def write(self, memory: GuestMemory) -> None:
        memory.fill(self.tables[0].address, self.end - self.tables[0].address)
        for table in self.tables:
            memory.write(table.address, table.data)


def _ecam_segments(layout: MemoryLayout, devices: Sequence[PlacedDevice]) -> list[tables.EcamSegment]:
    """An MCFG entry for each PCI segment's root (its share of the ECAM window, 1 MiB a bus),
    or the whole window as segment 0 when no root is placed."""
    roots = sorted(((int(d.properties.get("segment", 0)), d.mmio) for d in devices
                    if d.kind == "pci-host" and d.mmio is not None), key=lambda item: item[0])
    assert layout.pci_ecam is not None
    windows = [(segment, base, size) for segment, (base, size) in roots] or \
        [(0, layout.pci_ecam.start, layout.pci_ecam.size)]
    return [tables.EcamSegment(base, segment, 0, min(size >> 20, 256) - 1) for segment, base, size in windows]


def build_acpi(
    layout: MemoryLayout,
    devices: Sequence[PlacedDevice],
    *,
    apic_ids: Sequence[int],
    boot_vcpus: int,
    start: int = L.RSDP_START,
    end: int = L.ACPI_END,
) -> AcpiTables:
    """RSDP, XSDT, FADT, MADT, MCFG (when the layout has an ECAM window) and the DSDT for
    ``devices``.

    :raises ValueError: the tables do not fit in ``[start, end)``.
    """
    dsdt = tables.dsdt(dsdt_aml(devices, layout))
    kinds = {d.kind for d in devices}
    boot_arch = tables.IAPC_LEGACY_DEVICES | tables.IAPC_VGA_NOT_PRESENT
    if "i8042" in kinds:
        boot_arch |= tables.IAPC_8042
    if "rtc-cmos" not in kinds:
        boot_arch |= tables.IAPC_CMOS_RTC_NOT_PRESENT
    pm = _placed_pio(devices, "acpi-pm", P.ACPI_PM_PORT)
    sci_irq = next((d.irq for d in devices if d.kind == "acpi-pm" and d.irq is not None), interrupts.SCI_IRQ)

    cursor = start
    placed: list[AcpiTable] = []

    def put(signature: str, data: bytes) -> int:
        nonlocal cursor
        address = cursor
        placed.append(AcpiTable(signature, address, data))
        cursor = _align(address + len(data), TABLE_ALIGN)
        return address

    # Addresses are fixed in order; the XSDT's length is known before its entries are.
    rsdp_address = start
    cursor = _align(start + 36, TABLE_ALIGN)
    signatures = ["FACP", "APIC"] + (["MCFG"] if layout.pci_ecam is not None else [])
    xsdt_address = cursor
    cursor = _align(xsdt_address + tables.HEADER_SIZE + 8 * len(signatures), TABLE_ALIGN)
    dsdt_address = put("DSDT", dsdt)
    fadt_address = put(
        "FACP",
        tables.fadt(
            dsdt_address,
            sleep_control=pm + P.ACPI_PM_SLEEP_CONTROL,
            sleep_status=pm + P.ACPI_PM_SLEEP_STATUS,
            reset_port=pm + P.ACPI_PM_RESET,
            reset_value=P.ACPI_PM_RESET_VALUE,
            boot_arch=boot_arch,
            sci_irq=sci_irq,
        ),
    )
    madt_address = put(
        "APIC",
        tables.madt(
            apic_ids=apic_ids,
            enabled=boot_vcpus,
            lapic_address=L.APIC_START,
            ioapic_id=interrupts.ioapic_id(apic_ids),
            ioapic_address=L.IOAPIC_START,
            overrides=interrupts.INTERRUPT_OVERRIDES,
        ),
    )
    addresses = [fadt_address, madt_address]
    if layout.pci_ecam is not None:
        addresses.append(put("MCFG", tables.mcfg(_ecam_segments(layout, devices))))
    xsdt = tables.xsdt(addresses)
    result = [
        AcpiTable("RSDP", rsdp_address, tables.rsdp(xsdt_address)),
        AcpiTable("XSDT", xsdt_address, xsdt),
        *placed,
    ]
    if cursor > end:
        raise ValueError(
            f"ACPI tables need {cursor - start} bytes, more than the {end - start} bytes at {start:#x}"
        )
    return AcpiTables(rsdp_address, tuple(result))


def _placed_pio(devices: Sequence[PlacedDevice], kind: str, default: int) -> int:
    for d in devices:
        if d.kind == kind and d.pio is not None:
            return d.pio[0]
    return default


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
