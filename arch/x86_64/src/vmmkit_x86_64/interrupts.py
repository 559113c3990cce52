"""Interrupt routing of the PC platform, shared by the MADT and the MP table.

ISA IRQ n is IOAPIC pin n (GSI n), except IRQ 0, which is pin 2 (KVM wires its PIT there and
so does every PC since the IOAPIC), and IRQ 9, the ACPI SCI: level-triggered, active high.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from vmmkit.value import Value

#: MPS INTI flags (MADT and MP table alike): polarity bits 0-1 (1 high, 3 low), trigger bits
#: 2-3 (1 edge, 3 level); 0 means "conforms to the bus" (ISA: edge, active high).
INTI_CONFORMS: Final = 0
INTI_ACTIVE_HIGH: Final = 0b01
INTI_ACTIVE_LOW: Final = 0b11
INTI_EDGE: Final = 0b01 << 2
INTI_LEVEL: Final = 0b11 << 2

SCI_IRQ: Final = 9
IOAPIC_PINS: Final = 24


class InterruptOverride(Value):
    """An interrupt source override: ISA IRQ ``source`` is ``gsi``, with INTI ``flags``."""

    __slots__ = ("source", "gsi", "flags")

    def __init__(self, source: int, gsi: int, flags: int = INTI_CONFORMS) -> None:
        self.source = source
        self.gsi = gsi
        self.flags = flags


INTERRUPT_OVERRIDES: Final = (
    InterruptOverride(source=0, gsi=2),
    InterruptOverride(source=SCI_IRQ, gsi=SCI_IRQ, flags=INTI_ACTIVE_HIGH | INTI_LEVEL),
)


def isa_routes() -> list[tuple[int, int, int]]:
    """``(source IRQ, IOAPIC pin, INTI flags)`` for every IOAPIC pin wired to the ISA bus.

    IRQ 2 (the PIC cascade) has no pin: pin 2 belongs to IRQ 0. Pins 16-23 carry no ISA IRQ on
    real hardware; they are listed as ISA sources (edge, active high), as Firecracker does, so
    guests that use the MP table can route device interrupts there.
    """
    overrides = {o.source: o for o in INTERRUPT_OVERRIDES}
    routes = []
    for irq in range(IOAPIC_PINS):
        if irq == 2:
            continue
        override = overrides.get(irq)
        routes.append((irq, override.gsi, override.flags) if override else (irq, irq, INTI_CONFORMS))
    return routes


def ioapic_id(apic_ids: Sequence[int]) -> int:
    """The IOAPIC's ID: the first one above every processor's (the MP spec wants unique IDs),
    at most 0xfe; 0 when the processors use the whole 8-bit range."""
    candidate = max(apic_ids, default=0) + 1
    return candidate if candidate < 0xFF else 0
