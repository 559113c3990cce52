"""The DSDT body: ``_S5_`` and, under ``\\_SB_``, whatever the placed devices say of themselves.

Each placed device adds its own node through
:meth:`vmmkit.device.ManagedDevice.describe_acpi` and the :class:`DsdtScope` handed to it
(Cloud Hypervisor's ``impl Aml for ...``), in placement order; a device of any plugin is
therefore visible to the guest's OS without this module knowing its kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from vmmkit.acpi import aml
from vmmkit.acpi.aml import Name, Package, Scope
from vmmkit.arch import MemoryLayout
from vmmkit.device import ManagedDevice, PlacedDevice

#: ``_S5_``: SLP_TYPa = 5, what a guest writes to the sleep control register as ``5 << 2``.
S5_SLEEP_TYPE: Final = 5


class DsdtScope:
    """The :class:`vmmkit.firmware.AcpiScope` of the DSDT's ``\\_SB_``."""

    def __init__(self, layout: MemoryLayout) -> None:
        self._layout = layout
        self.terms: list[aml.Term] = []
        self._indices: dict[str, int] = {}

    @property
    def layout(self) -> MemoryLayout:
        return self._layout

    def next_index(self, key: str) -> int:
        index = self._indices.get(key, 0)
        self._indices[key] = index + 1
        return index

    def add(self, *terms: aml.Term) -> None:
        self.terms.extend(terms)


def dsdt_aml(devices: Sequence[PlacedDevice], layout: MemoryLayout) -> bytes:
    """The AML of the DSDT describing ``devices``."""
    scope = DsdtScope(layout)
    for placed in devices:
        if isinstance(placed.device, ManagedDevice):
            placed.device.describe_acpi(placed, scope)
    body: list[aml.Term] = [Name("_S5_", Package([S5_SLEEP_TYPE, 0, 0, 0])), Scope("\\_SB_", scope.terms)]
    return aml.encode_all(body)
