"""A PCI function as the root complex sees it: a configuration space, and BARs that the
root maps onto the MMIO or port-I/O bus wherever the guest programs them.

A function never learns where its BARs are from the bus: :meth:`PciFunction.bar_read` and
:meth:`PciFunction.bar_write` get ``(bar index, offset in the BAR, ...)``. The root tells it
:meth:`bar_mapped` / :meth:`bar_unmapped` when a BAR starts or stops decoding at an address,
which is when a function with ioeventfds (virtio notify addresses) moves them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from vmmkit.device import ManagedDevice
from vmmkit.pci.config import PIN_INTA, PIN_NONE, PciConfigSpace

if TYPE_CHECKING:
    from vmmkit.irq import InterruptLine


class PciFunction(ManagedDevice):
    """Base class of the functions on a :class:`vmmkit.pci.host.PciRoot`.

    Subclasses build :attr:`config` (header, BARs, capabilities) in ``__init__`` and override
    the BAR accessors; the root calls everything here with guest-controlled offsets and
    sizes, already range-checked against the configuration space, not against the BAR.
    """

    kind: ClassVar[str] = "pci"
    #: Placed by the ``pci`` transport (or wrapped by one, as ``virtio-pci`` does).
    transport_family: ClassVar[str] = "pci"

    def __init__(self, name: str, config: PciConfigSpace) -> None:
        self.name = name
        self.config = config
        #: Set by the root when plugged: re-evaluates this function's BAR mappings.
        self.remap: Callable[[], None] = lambda: None
        #: The legacy INTA line (``None``: none, MSI/MSI-X only).
        self.intx: InterruptLine | None = None
        #: ``segment << 16 | bus << 8 | devfn`` once plugged: the device ID its MSIs carry.
        self.requester_id: int | None = None

    def set_requester_id(self, requester_id: int) -> None:
        """Called by the root when the function is plugged; subclasses with MSI-X pass it on
        (:meth:`vmmkit.pci.msix.MsixTable.set_requester_id`)."""
        self.requester_id = requester_id

    def connect_intx(self, line: InterruptLine | None, irq: int | None) -> None:
        """The legacy INTA line and its number for the Interrupt Line register (``None``:
        no line; the function interrupts only through MSI/MSI-X)."""
        self.intx = line
        if line is None or irq is None:
            self.config.set_interrupt(0, PIN_NONE)
        else:
            self.config.set_interrupt(irq & 0xFF, PIN_INTA)

    def placement_properties(self) -> Mapping[str, Any]:
        """Facts for the function's :attr:`vmmkit.device.PlacedDevice.properties`, beside its
        address (``bdf``, ``segment``, ``slot``, ``bars``)."""
        return {}

    # -- configuration space ---------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    # -- BARs --------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Ignored unless a subclass handles it."""

    def bar_mapped(self, index: int, base: int) -> None:
        """BAR ``index`` now decodes at ``base`` (on the bus its kind selects)."""

    def bar_unmapped(self, index: int, base: int) -> None:
        """BAR ``index`` stopped decoding at ``base``."""

    # -- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Power-on state: the configuration space as firmware left it, BARs re-mapped."""
        self.config.reset()
        self.remap()

    def describe(self) -> Mapping[str, Any]:
        return {}


class BarRegion:
    """The bus device standing for one BAR of one function: forwards ``(offset, bytes)``."""

    __slots__ = ("function", "index", "size")

    def __init__(self, function: PciFunction, index: int, size: int) -> None:
        self.function = function
        self.index = index
        self.size = size

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if not 0 <= offset or offset + size > self.size:
            return b"\xff" * size
        data = self.function.bar_read(self.index, offset, size)
        if len(data) != size:
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, offset: int, data: bytes) -> None:
        if data and 0 <= offset and offset + len(data) <= self.size:
            self.function.bar_write(self.index, offset, bytes(data))

    def __repr__(self) -> str:
        return f"BarRegion({self.function.name}, BAR{self.index}, {self.size:#x})"
