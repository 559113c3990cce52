"""Interrupts for emulated x86 guests: the I/O APIC (:mod:`vmmkit.ioapic`), local-APIC
acceptance (IRR/ISR/TMR, EOI, priorities) and delivery through the guest's IDT.

unicorn has no interrupt controller and no way to raise an interrupt, so the backend models the
PC's (as KVM's in-kernel irqchip does) and *injects* each interrupt itself while the engine is
stopped: it pushes the frame an interrupt gate pushes (64-bit: SS, RSP, RFLAGS, CS, RIP after
aligning RSP to 16; 32-bit: EFLAGS, CS, EIP, no stack switch at CPL 0), clears IF (interrupt
gates) and TF, and continues at the gate's offset. The guest's IRET is unicorn's own.

Sources: Intel SDM vol. 3 chapters 6.12 (exception and interrupt handling), 10.8 (local APIC:
IRR, ISR, TMR, EOI, priority classes), and the 82093AA I/O APIC datasheet (IOREGSEL at 0x00,
IOWIN at 0x10, redirection entries from register 0x10; version 0x11, 24 pins; the EOI register
at 0x40 of version 0x20 APICs).

Limits: stacks and the IDT are accessed at their linear addresses as physical ones (true for
guests that identity-map them, as the vmmkit test guests and early kernels do); privilege-level
changes (a user-mode interrupt switching to the TSS's RSP0), task gates and the IST are not
modelled; an NMI is not blocked until the next IRET.
"""

from __future__ import annotations

import struct

from vmmkit.ioapic import (
    EXTINT,
    FIXED,
    INIT,
    IOAPIC_BASE,
    IOAPIC_PINS,
    IOAPIC_SIZE,
    LOWEST_PRIORITY,
    NMI,
    STARTUP,
    Deliver,
    IoApic,
)

__all__ = ["ERROR_CODE_VECTORS", "EXTINT", "FIXED", "INIT", "IOAPIC_BASE", "IOAPIC_PINS", "IOAPIC_SIZE",
           "LOWEST_PRIORITY", "NMI", "STARTUP", "Deliver", "IoApic", "highest_bit", "set_bit", "test_bit"]

#: Vectors whose exception pushes an error code (SDM vol. 3 table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def highest_bit(page: bytes | bytearray, offset: int) -> int:
    """The highest vector set in the 256-bit register at ``offset`` (IRR, ISR, TMR), or -1."""
    for word in range(7, -1, -1):
        value = int(struct.unpack_from("<I", page, offset + 0x10 * word)[0])
        if value:
            return word * 32 + value.bit_length() - 1
    return -1


def set_bit(page: bytearray, offset: int, vector: int, on: bool) -> None:
    at = offset + 0x10 * (vector // 32)
    value = struct.unpack_from("<I", page, at)[0]
    bit = 1 << (vector % 32)
    struct.pack_into("<I", page, at, value | bit if on else value & ~bit)


def test_bit(page: bytes | bytearray, offset: int, vector: int) -> bool:
    return bool(struct.unpack_from("<I", page, offset + 0x10 * (vector // 32))[0] >> (vector % 32) & 1)
