"""What a device uses to describe itself in the guest's firmware tables.

The architecture owns the tables (a DSDT on ACPI platforms, a flattened device tree on
AArch64) and hands each placed device a writer; the device adds its own node through
:meth:`vmmkit.device.ManagedDevice.describe_acpi` / ``describe_fdt``. The AML terms come from
:mod:`vmmkit.acpi.aml`, which is architecture-neutral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vmmkit.acpi.aml import Term
    from vmmkit.arch import MemoryLayout


class AcpiScope(Protocol):
    """The DSDT's ``\\_SB_`` scope as a device sees it."""

    @property
    def layout(self) -> MemoryLayout: ...

    def next_index(self, key: str) -> int:
        """0, 1, 2, ... per ``key``: for names and ``_UID`` s unique among devices of a kind
        (``COM1``, ``COM2``)."""
        ...

    def add(self, *terms: Term) -> None:
        """Append AML terms (usually one ``Device``) to ``\\_SB_``."""
        ...


class FdtWriter(Protocol):
    """The device tree's root node, open for one device's node (pylibfdt's ``FdtSw`` calls,
    plus the encodings that depend on the architecture's interrupt controller and clocks)."""

    def begin_node(self, name: str) -> None: ...

    def end_node(self) -> None: ...

    def property(self, name: str, value: bytes) -> None: ...

    def property_string(self, name: str, value: str) -> None: ...

    def property_strings(self, name: str, *values: str) -> None:
        """A string list (``compatible``)."""
        ...

    def property_u32(self, name: str, value: int) -> None: ...

    def property_reg(self, start: int, size: int) -> None:
        """``reg`` with the root's address and size cells."""
        ...

    def property_interrupt(self, irq: int, *, edge: bool) -> None:
        """``interrupts`` for interrupt line ``irq`` (a GSI as the device manager allocated
        it), rising-edge or level-high."""
        ...

    def interrupt_specifier(self, irq: int, *, edge: bool) -> bytes:
        """Interrupt line ``irq`` as an entry of an ``interrupt-map`` names it: the interrupt
        controller's phandle, its unit-address cells and its interrupt specifier."""
        ...

    def property_clocks(self, *names: str) -> None:
        """``clocks`` and ``clock-names``: the platform's fixed peripheral clock under each name
        (``"uartclk", "apb_pclk"``)."""
        ...

    def property_msi_map(self, device_id_base: int, length: int) -> None:
        """``msi-map`` (Documentation/devicetree/bindings/pci/pci-msi.txt): PCI requester IDs
        ``0 .. length - 1`` of this host bridge reach the platform's MSI controller as device IDs
        from ``device_id_base``. Writes nothing where the platform has no MSI controller (the
        guest then uses INTx)."""
        ...

    def set_stdout(self, path: str) -> None:
        """Make the node at ``path`` the console (``/chosen/stdout-path``)."""
        ...
