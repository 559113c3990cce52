"""The Intel MultiProcessor Specification 1.4 table, for guests that look for one.

A floating pointer structure at the start of the EBDA (0x9fc00, inside the last KiB of base
memory, where Linux and others search) points at the configuration table right after it:
one processor entry per possible vCPU (APIC IDs up to 254), one ISA bus, the IOAPIC, an I/O
interrupt entry per IOAPIC pin routed as in :mod:`vmmkit_x86_64.interrupts`, and LINT0 =
ExtINT, LINT1 = NMI.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from vmmkit_x86_64 import interrupts
from vmmkit_x86_64.interrupts import INTI_CONFORMS

SPEC_REVISION: Final = 4  #: MP 1.4
LAPIC_VERSION: Final = 0x14
IOAPIC_VERSION: Final = 0x11
CPU_ENABLED: Final = 1 << 0
CPU_BOOTSTRAP: Final = 1 << 1
#: Family 6, model 0, stepping 0; FPU and APIC present (guests read CPUID for the real values).
CPU_SIGNATURE: Final = 0x600
CPU_FEATURES: Final = (1 << 0) | (1 << 9)
INT_TYPE_INT: Final = 0
INT_TYPE_NMI: Final = 1
INT_TYPE_EXTINT: Final = 3
ISA_BUS_ID: Final = 0

FLOATING_POINTER_SIZE: Final = 16
HEADER_SIZE: Final = 44


def checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def mptable(
    address: int,
    *,
    apic_ids: Sequence[int],
    enabled: int,
    ioapic_id: int,
    ioapic_address: int,
    lapic_address: int,
) -> bytes:
    """The floating pointer at ``address`` followed by the configuration table."""
    entries = bytearray()
    count = 0
    for index, apic_id in enumerate(apic_ids):
        if apic_id >= 0xFF:
            continue  # not representable here; the MADT lists it
        flags = (CPU_ENABLED if index < enabled else 0) | (CPU_BOOTSTRAP if index == 0 else 0)
        entries += struct.pack("<BBBBII8x", 0, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
        count += 1
    entries += struct.pack("<BB6s", 1, ISA_BUS_ID, b"ISA   ")
    entries += struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, ioapic_address)
    count += 2
    for irq, pin, flags in interrupts.isa_routes():
        entries += struct.pack("<BBHBBBB", 3, INT_TYPE_INT, flags, ISA_BUS_ID, irq, ioapic_id, pin)
        count += 1
    entries += struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, INTI_CONFORMS, ISA_BUS_ID, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, INTI_CONFORMS, ISA_BUS_ID, 0, 0xFF, 1)
    count += 2
    length = HEADER_SIZE + len(entries)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            length,
            SPEC_REVISION,
            0,
            b"VMMKIT  ",
            b"VMMKIT MP   ",
            0,
            0,
            count,
            lapic_address,
            0,
            0,
            0,
        )
    )
    table = header + entries
    table[7] = checksum(table)
    pointer = bytearray(
        struct.pack("<4sIBBB5x", b"_MP_", address + FLOATING_POINTER_SIZE, 1, SPEC_REVISION, 0)
    )
    pointer[10] = checksum(pointer)
    return bytes(pointer + table)
