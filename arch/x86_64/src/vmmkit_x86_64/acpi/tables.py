"""Binary ACPI tables: RSDP, XSDT, FADT, MADT, MCFG and the DSDT wrapper (ACPI 6.5, chapter 5).

Each builder returns the finished table bytes, checksum included.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from vmmkit.value import Value
from vmmkit_x86_64.interrupts import INTI_CONFORMS, InterruptOverride

OEM_ID: Final = b"VMMKIT"
CREATOR_ID: Final = b"VMMK"
OEM_REVISION: Final = 1
CREATOR_REVISION: Final = 1
HEADER_SIZE: Final = 36


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero (mod 256) when stored in its checksum field."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, *, table_id: bytes | None = None) -> bytes:
    """A System Description Table: the 36-byte header, then ``body``, with its checksum."""
    if len(signature) != 4:
        raise ValueError(f"bad table signature {signature!r}")
    table_id = (table_id or b"VMMK" + signature).ljust(8, b" ")[:8]
    length = HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        length,
        revision,
        0,
        OEM_ID,
        table_id,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    """The ACPI 2.0+ Root System Description Pointer (36 bytes): no RSDT, only the XSDT."""
    first = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 2, 0))
    first[8] = checksum(first)
    table = bytearray(first + struct.pack("<IQB3s", 36, xsdt_address, 0, b"\0\0\0"))
    table[32] = checksum(table)
    return bytes(table)


def xsdt(addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


# -- FADT -------------------------------------------------------------------------------------

FADT_REVISION: Final = 6
FADT_MINOR_REVISION: Final = 3
FADT_SIZE: Final = 276

# Fixed feature flags (ACPI 6.5, table 5.10).
FADT_F_WBINVD: Final = 1 << 0
FADT_F_PWR_BUTTON: Final = 1 << 4  #: no fixed-feature power button
FADT_F_SLP_BUTTON: Final = 1 << 5  #: no fixed-feature sleep button
FADT_F_RESET_REG_SUP: Final = 1 << 10
FADT_F_HW_REDUCED_ACPI: Final = 1 << 20

# IA-PC boot architecture flags (table 5.11).
IAPC_LEGACY_DEVICES: Final = 1 << 0
IAPC_8042: Final = 1 << 1
IAPC_VGA_NOT_PRESENT: Final = 1 << 2
IAPC_MSI_NOT_SUPPORTED: Final = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT: Final = 1 << 5

SYSTEM_IO: Final = 1
ACCESS_BYTE: Final = 1


class Gas(Value):
    """A Generic Address Structure."""

    __slots__ = ("space", "bit_width", "bit_offset", "access_size", "address")

    def __init__(
        self, space: int = 0, bit_width: int = 0, bit_offset: int = 0, access_size: int = 0, address: int = 0
    ) -> None:
        self.space = space
        self.bit_width = bit_width
        self.bit_offset = bit_offset
        self.access_size = access_size
        self.address = address

    def pack(self) -> bytes:
        return struct.pack(
            "<BBBBQ", self.space, self.bit_width, self.bit_offset, self.access_size, self.address
        )

    @classmethod
    def io_byte(cls, port: int) -> Gas:
        return cls(SYSTEM_IO, 8, 0, ACCESS_BYTE, port)


def fadt(
    dsdt_address: int,
    *,
    sleep_control: int,
    sleep_status: int,
    reset_port: int,
    reset_value: int,
    boot_arch: int,
    sci_irq: int,
) -> bytes:
    """A hardware-reduced FADT (revision 6): no PM1/GPE blocks; sleep control/status and
    reset registers in I/O space; the DSDT through X_DSDT (and DSDT while it fits 32 bits)."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, body, offset - HEADER_SIZE, *values)

    put(36, "I", 0)  # FIRMWARE_CTRL
    put(40, "I", dsdt_address if dsdt_address < 1 << 32 else 0)
    put(45, "B", 0)  # Preferred_PM_Profile: unspecified
    put(46, "H", sci_irq)
    put(109, "H", boot_arch)
    put(
        112,
        "I",
        FADT_F_WBINVD | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP | FADT_F_HW_REDUCED_ACPI,
    )
    body[116 - HEADER_SIZE : 128 - HEADER_SIZE] = Gas.io_byte(reset_port).pack()
    put(128, "B", reset_value)
    put(131, "B", FADT_MINOR_REVISION)
    put(140, "Q", dsdt_address)  # X_DSDT
    body[244 - HEADER_SIZE : 256 - HEADER_SIZE] = Gas.io_byte(sleep_control).pack()
    body[256 - HEADER_SIZE : 268 - HEADER_SIZE] = Gas.io_byte(sleep_status).pack()
    put(268, "8s", b"VMMKIT\0\0")  # hypervisor vendor identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# -- MADT -------------------------------------------------------------------------------------

MADT_REVISION: Final = 5  #: ACPI 6.3+: the Online Capable flag is defined
MADT_PCAT_COMPAT: Final = 1
LAPIC_ENABLED: Final = 1 << 0
LAPIC_ONLINE_CAPABLE: Final = 1 << 1


def madt(
    *,
    apic_ids: Sequence[int],
    enabled: int,
    lapic_address: int,
    ioapic_id: int,
    ioapic_address: int,
    overrides: Sequence[InterruptOverride],
) -> bytes:
    """The MADT: a Local APIC (x2APIC for IDs above 254) entry per possible vCPU, enabled for
    the first ``enabled`` and online-capable after; one IOAPIC at GSI 0; the interrupt source
    overrides; LINT1 = NMI on every processor."""
    body = bytearray(struct.pack("<II", lapic_address, MADT_PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        body += processor_entry(uid, apic_id, LAPIC_ENABLED if uid < enabled else LAPIC_ONLINE_CAPABLE)
    body += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, ioapic_address, 0)
    for override in overrides:
        body += struct.pack("<BBBBIH", 2, 10, 0, override.source, override.gsi, override.flags)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, INTI_CONFORMS, 1)  # Local APIC NMI: all, LINT1
    if any(apic_id >= 0xFF for apic_id in apic_ids):
        body += struct.pack("<BBHIBBBB", 0x0A, 12, INTI_CONFORMS, 0xFFFFFFFF, 1, 0, 0, 0)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def processor_entry(uid: int, apic_id: int, flags: int = LAPIC_ENABLED) -> bytes:
    """One processor's MADT entry (ACPI 6.5, 5.2.12.2 and 5.2.12.12): a Local APIC entry, or a
    Local x2APIC entry for APIC IDs above 254. With ``flags`` enabled, it is also what a CPU
    hotplug ``_MAT`` returns (Cloud Hypervisor's ``Cpu::generate_mat``)."""
    if apic_id < 0xFF:
        return struct.pack("<BBBBI", 0, 8, uid, apic_id, flags)
    return struct.pack("<BBHIII", 9, 16, 0, apic_id, flags, uid)


# -- MCFG -------------------------------------------------------------------------------------


class EcamSegment(Value):
    """One MCFG entry: the ECAM window at ``base`` for ``segment``, buses ``start_bus-end_bus``."""

    __slots__ = ("base", "segment", "start_bus", "end_bus")

    def __init__(self, base: int, segment: int = 0, start_bus: int = 0, end_bus: int = 255) -> None:
        self.base = base
        self.segment = segment
        self.start_bus = start_bus
        self.end_bus = end_bus


def mcfg(segments: Sequence[EcamSegment]) -> bytes:
    body = bytearray(8)
    for s in segments:
        body += struct.pack("<QHBBI", s.base, s.segment, s.start_bus, s.end_bus, 0)
    return sdt(b"MCFG", 1, bytes(body))


def dsdt(aml: bytes) -> bytes:
    """The DSDT around ``aml`` (revision 2: 64-bit integers)."""
    return sdt(b"DSDT", 2, aml)
