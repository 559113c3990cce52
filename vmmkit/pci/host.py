"""The PCI root complex of a segment: host bridge, configuration access, BAR placement.

One :class:`PciRoot` per segment, created by the device manager
(:meth:`vmmkit.device_manager.DeviceManager.pci_segment`, through :func:`create_root`) when the
first PCI function is placed there. It serves bus 0 only:

- 00:00.0 is a host bridge (vendor 0x8086, device 0x0d57, class 06/00/00, as in Cloud
  Hypervisor), so guests probing for a working type-1 mechanism (Linux's
  ``pci_sanity_check``) find a host bridge;
- functions go in slots 1-31 (function 0 only), the lowest free slot unless one is asked for;
- configuration space is reached through port 0xCF8 (the address register, 32-bit accesses
  only) and the 0xCFC-0xCFF data window (any byte lanes of the selected dword), where the
  architecture has port I/O, and through ECAM at ``layout.pci_ecam``
  (``offset = bus << 20 | device << 15 | function << 12 | register``); both paths reach the
  same :meth:`PciRoot.config_read` / :meth:`PciRoot.config_write`. Nothing at an address
  reads as all ones (so vendor 0xFFFF), and writes there are dropped.

BARs are assigned from ``layout.pci_mmio32`` (32-bit memory), ``layout.pci_mmio64`` (64-bit
memory, falling back to the 32-bit window) and ``layout.pio`` (I/O), naturally aligned and
at least a page for memory, and decoding is enabled at power-on as firmware would leave it.
A BAR is on the bus exactly while the command register enables its space and it holds a
non-zero address it can decode (QEMU's ``pci_update_mappings``): when the guest disables
decoding (Linux does around BAR sizing), reprograms a BAR or re-enables decoding, the root
removes the region from the MMIO or port bus and inserts it at the new address, and tells
the function (:meth:`PciFunction.bar_mapped`), which moves its ioeventfds. A BAR the guest
moves onto something already on the bus stays unmapped (logged) until moved again. The
address allocators keep the power-on assignment; a moved BAR is not re-reserved.

Legacy INTx: every function's INTA goes to one of at most four interrupt lines
(the device manager's ``allocate_irq()``), line ``(slot - 1) % 4, like the four PIRQ links of a PC
chipset (if the machine runs out of lines, an existing one is shared). The lines are
level-triggered and shared: a line is high while any function on it asserts it.

The root describes itself to the guest (:meth:`PciRoot.describe_acpi`: a ``PNP0A08`` root bridge
with its windows and the ``_PRT`` of those INTx routes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from vmmkit.allocator import AddressAllocator
from vmmkit.bus import Bus
from vmmkit.device import DeviceRequest, ManagedDevice, PlacedDevice
from vmmkit.errors import BusError, DeviceError
from vmmkit.irq import InterruptLine
from vmmkit.log import get_logger
from vmmkit.memory import MemoryRange
from vmmkit.pci.config import (
    BAR0,
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    NUM_BARS,
    PIN_INTA,
    PIN_NONE,
    BarKind,
    PciBar,
    PciConfigSpace,
    overlaps,
)
from vmmkit.pci.function import BarRegion, PciFunction

if TYPE_CHECKING:
    from vmmkit.device_manager import SegmentWindows
    from vmmkit.firmware import AcpiScope, FdtWriter
    from vmmkit.transport import DeviceHost

log = get_logger()

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_IO_SIZE = 8
#: The address register's enable bit; bits 1:0 read as zero.
_CONFIG_ENABLE = 0x8000_0000
_CONFIG_ADDRESS_MASK = 0xFFFF_FFFC

HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57
MAX_SLOTS = 32
#: Most interrupt lines PCI INTx takes from the machine; slots share them round-robin.
MAX_INTX_LINES = 4
_PAGE = 4096
_ECAM_BUS_SHIFT = 20


def segment_name(segment: int) -> str:
    """The DSDT name of a segment's root bridge: ``PCI0``, ``PC01``..."""
    return "PCI0" if segment == 0 else f"PC{segment:02X}"


def bdf_string(segment: int, bus: int, slot: int, function: int = 0) -> str:
    return f"{segment:04x}:{bus:02x}:{slot:02x}.{function:x}"


def requester_id(segment: int, bus: int, slot: int, function: int = 0) -> int:
    """The ID a function's MSIs carry (Cloud Hypervisor's ``PciBdf`` as a u32): the segment in
    bits 31:16, then the 16-bit PCI requester ID ``bus << 8 | slot << 3 | function``."""
    return segment << 16 | bus << 8 | slot << 3 | function


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0


class HostBridge(PciFunction):
    """00:00.0: a host bridge with no BARs (vendor 0x8086, device 0x0d57)."""

    kind: ClassVar[str] = "pci-host-bridge"

    def __init__(self) -> None:
        super().__init__(
            "host-bridge",
            PciConfigSpace(vendor_id=HOST_BRIDGE_VENDOR, device_id=HOST_BRIDGE_DEVICE,
                           class_code=0x06, subclass=0x00),
        )


class SharedIntx:
    """A level-triggered line shared by several functions: high while any asserts it."""

    def __init__(self, gsi: int, line: InterruptLine) -> None:
        self.gsi = gsi
        self.line = line
        self._asserted: set[int] = set()
        self._lock = threading.Lock()

    def set_level(self, source: int, high: bool) -> None:
        with self._lock:
            before = bool(self._asserted)
            if high:
                self._asserted.add(source)
            else:
                self._asserted.discard(source)
            after = bool(self._asserted)
            if before != after:
                self.line.set_level(after)


class IntxPin:
    """One function's INTA: an :class:`vmmkit.irq.InterruptLine` over a :class:`SharedIntx`."""

    def __init__(self, shared: SharedIntx, source: int) -> None:
        self.shared = shared
        self.source = source
        self.gsi = shared.gsi

    def set_level(self, high: bool) -> None:
        self.shared.set_level(self.source, high)

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)


@attrs.define
class _Mapping:
    base: int
    region: BarRegion
    io: bool


@attrs.define
class _Slot:
    function: PciFunction
    allocations: list[tuple[AddressAllocator, int]]
    intx: IntxPin | None = None


class PciRoot(ManagedDevice):
    """Bus 0 of a PCI segment: functions by device/function number, BARs on the buses."""

    kind: ClassVar[str] = "pci-host"
    transport_family: ClassVar[str] = "pci"

    def __init__(
        self,
        *,
        mmio_bus: Bus,
        pio_bus: Bus,
        mmio32: MemoryRange | None,
        mmio64: MemoryRange | None = None,
        io: MemoryRange | None = None,
        ecam: MemoryRange | None = None,
        segment: int = 0,
        alloc64: AddressAllocator | None = None,
    ) -> None:
        self.mmio_bus = mmio_bus
        self.pio_bus = pio_bus
        self.segment = segment
        self.bus_range = (0, 0)
        self.mmio32 = mmio32
        self.mmio64 = mmio64
        self.io = io
        self.ecam = ecam
        self._alloc32 = _allocator(mmio32, "PCI 32-bit MMIO window")
        #: ``alloc64``: the device manager's, shared with device memory (virtio-pmem).
        self._alloc64 = alloc64 if alloc64 is not None else _allocator(mmio64, "PCI 64-bit MMIO window")
        self._alloc_io = _allocator(io, "PCI I/O window")
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self._mapped: dict[tuple[int, int], _Mapping] = {}
        self._intx_lines: dict[int, SharedIntx] = {}
        self.config_address = 0
        #: Functions come and go while the guest runs (ACPI PCI hotplug, :mod:`vmmkit.pci.hotplug`):
        #: the DSDT then has the slot devices, and the ``_PRT`` routes every slot.
        self.hotplug = False
        self.host_bridge = HostBridge()
        self._plug(0, self.host_bridge, [])

    # -- functions ---------------------------------------------------------------------------

    @property
    def functions(self) -> Mapping[int, PciFunction]:
        """Functions by slot (device number); slot 0 is the host bridge."""
        return {slot: entry.function for slot, entry in self._slots.items()}

    def slot_of(self, function: PciFunction) -> int:
        for slot, entry in self._slots.items():
            if entry.function is function:
                return slot
        raise DeviceError(f"{function.name} is not on this PCI bus")

    def free_slot(self, wanted: int | None = None) -> int:
        """``wanted`` if it is free (1-31), else the lowest free slot."""
        with self._lock:
            if wanted is not None:
                if not 1 <= wanted < MAX_SLOTS:
                    raise DeviceError(f"PCI device id {wanted} is not a usable slot (1-31)")
                if wanted in self._slots:
                    user = self._slots[wanted].function.name
                    raise DeviceError(f"PCI slot {wanted} is already used by {user}")
                return wanted
            for slot in range(1, MAX_SLOTS):
                if slot not in self._slots:
                    return slot
        raise DeviceError("all 31 PCI slots on bus 0 are used")

    def add_function(self, function: PciFunction, slot: int | None = None) -> int:
        """Plug ``function`` into ``slot`` (or the lowest free one), assign its BARs from the
        windows, enable decoding and map them. Returns the slot."""
        with self._lock:
            slot = self.free_slot(slot)
            allocations: list[tuple[AddressAllocator, int]] = []
            try:
                command = 0
                for bar in sorted(function.config.bars.values(), key=lambda b: -b.size):
                    allocator, base = self._allocate_bar(bar)
                    allocations.append((allocator, base))
                    function.config.set_bar_address(bar.index, base)
                    command |= COMMAND_IO if bar.is_io else COMMAND_MEMORY
            except Exception:
                for allocator, base in allocations:
                    allocator.free(base)
                raise
            config = function.config
            config.set(COMMAND, 2, config.get(COMMAND, 2) | command)
            self._plug(slot, function, allocations)
            log.debug("pci.function_added", slot=slot, function=function.name)
            return slot

    def _plug(self, slot: int, function: PciFunction,
              allocations: list[tuple[AddressAllocator, int]]) -> None:
        self._slots[slot] = _Slot(function, allocations)
        function.set_requester_id(requester_id(self.segment, 0, slot))
        function.remap = lambda: self.remap(function)
        self.remap(function)

    def remove_function(self, slot: int) -> PciFunction:
        """Unplug the function in ``slot``: unmap its BARs and release its windows."""
        with self._lock:
            if slot == 0 or slot not in self._slots:
                raise DeviceError(f"no removable PCI function in slot {slot}")
            entry = self._slots.pop(slot)
            for index in list(entry.function.config.bars):
                self._unmap(slot, entry.function, index)
            for allocator, base in entry.allocations:
                allocator.free(base)
            if entry.intx is not None:
                entry.intx.set_level(False)
            entry.function.remap = lambda: None
            return entry.function

    def _allocate_bar(self, bar: PciBar) -> tuple[AddressAllocator, int]:
        if bar.is_io:
            candidates = [self._alloc_io]
        elif bar.kind is BarKind.MEM64:
            candidates = [self._alloc64, self._alloc32]
        else:
            candidates = [self._alloc32]
        size = bar.size if bar.is_io else max(bar.size, _PAGE)
        errors = []
        for allocator in candidates:
            if allocator is None:
                continue
            try:
                return allocator, allocator.allocate(size, size)
            except BusError as exc:
                errors.append(str(exc))
        what = "I/O" if bar.is_io else "memory"
        raise DeviceError(f"no room for a {bar.size:#x}-byte {what} BAR: {'; '.join(errors) or 'no window'}")

    # -- legacy interrupts -------------------------------------------------------------------

    def connect_intx(self, function: PciFunction,
                     allocate_irq: Callable[[int | None], tuple[int, InterruptLine]]) -> IntxPin | None:
        """Give ``function`` an INTA pin on interrupt line ``(slot - 1) % 4``, taking that line
        from the machine the first time; ``None`` when the machine has no line to spare (the
        function then interrupts only through MSI-X)."""
        with self._lock:
            slot = self.slot_of(function)
            index = (slot - 1) % MAX_INTX_LINES
            if index not in self._intx_lines and not self.hotplug:
                self._take_intx_line(index, allocate_irq)
            shared = self._line_for(slot)
            if shared is None:
                return None
            pin = IntxPin(shared, slot)
            self._slots[slot].intx = pin
            return pin

    def reserve_intx_lines(self, allocate_irq: Callable[[int | None], tuple[int, InterruptLine]]) -> None:
        """Take all four INTx lines now (hotplug: the DSDT's ``_PRT`` written at boot must
        route the slots that are still empty, as CH's reserved PCI IRQs do)."""
        with self._lock:
            for index in range(MAX_INTX_LINES):
                if index not in self._intx_lines:
                    self._take_intx_line(index, allocate_irq)

    def _take_intx_line(self, index: int,
                        allocate_irq: Callable[[int | None], tuple[int, InterruptLine]]) -> None:
        try:
            gsi, line = allocate_irq(None)
        except DeviceError:
            return  # out of lines: this index shares another (:meth:`_line_for`)
        self._intx_lines[index] = SharedIntx(gsi, line)

    def _line_for(self, slot: int) -> SharedIntx | None:
        """The line of ``slot``: line ``(slot - 1) % 4``, else (the machine ran out) the first."""
        shared = self._intx_lines.get((slot - 1) % MAX_INTX_LINES)
        return shared if shared is not None else next(iter(self._intx_lines.values()), None)

    def intx_routes(self) -> tuple[tuple[int, int, int], ...]:
        """``(slot, pin, gsi)`` for every function with a legacy interrupt (pin 1 = INTA); with
        :attr:`hotplug`, for every slot 1-31 that has a line (a function may arrive there)."""
        if self.hotplug:
            routes = []
            for slot in range(1, MAX_SLOTS):
                shared = self._line_for(slot)
                if shared is not None:
                    routes.append((slot, 1, shared.gsi))
            return tuple(routes)
        return tuple((slot, 1, entry.intx.gsi) for slot, entry in sorted(self._slots.items())
                     if entry.intx is not None)

    # -- configuration access ----------------------------------------------------------------

    def config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        """Read ``size`` bytes of the configuration space of ``bus:devfn``; all ones if absent."""
        function = self._function(bus, devfn)
        if function is None:
            return _ones(size)
        with self._lock:
            return function.config_read(offset, size)

    def config_write(self, bus: int, devfn: int, offset: int, size: int, value: int) -> None:
        function = self._function(bus, devfn)
        if function is None or not function.config.valid_access(offset, size):
            return
        with self._lock:
            function.config_write(offset, size, value)
            if overlaps(offset, size, COMMAND, 2) or overlaps(offset, size, BAR0, 4 * NUM_BARS):
                self.remap(function)

    def _function(self, bus: int, devfn: int) -> PciFunction | None:
        if bus != 0 or devfn & 7:
            return None
        entry = self._slots.get(devfn >> 3)
        return entry.function if entry is not None else None

    # -- BAR mappings ------------------------------------------------------------------------

    def remap(self, function: PciFunction) -> None:
        """Put each BAR of ``function`` where its registers and the command register say."""
        with self._lock:
            try:
                slot = self.slot_of(function)
            except DeviceError:
                return
            for index in function.config.bars:
                self._update(slot, function, index)

    def _wanted(self, function: PciFunction, index: int) -> int | None:
        config = function.config
        bar = config.bars[index]
        if not config.bar_decoding(index):
            return None
        base = config.bar_address(index)
        if base == 0 or base + bar.size > bar.address_limit:
            return None
        return base

    def _update(self, slot: int, function: PciFunction, index: int) -> None:
        want = self._wanted(function, index)
        current = self._mapped.get((slot, index))
        if current is not None and current.base == want:
            return
        self._unmap(slot, function, index)
        if want is None:
            return
        bar = function.config.bars[index]
        region = BarRegion(function, index, bar.size)
        bus = self.pio_bus if bar.is_io else self.mmio_bus
        try:
            bus.insert(region, want, bar.size)
        except BusError as exc:
            log.warning("pci.bar_unmapped", function=function.name, bar=index, address=hex(want),
                        error=str(exc))
            return
        self._mapped[(slot, index)] = _Mapping(want, region, bar.is_io)
        log.debug("pci.bar_mapped", function=function.name, bar=index, address=hex(want))
        function.bar_mapped(index, want)

    def _unmap(self, slot: int, function: PciFunction, index: int) -> None:
        current = self._mapped.pop((slot, index), None)
        if current is None:
            return
        bus = self.pio_bus if current.io else self.mmio_bus
        try:
            bus.remove(current.base)
        except BusError:
            pass
        function.bar_unmapped(index, current.base)

    def bar_base(self, function: PciFunction, index: int) -> int | None:
        """Where BAR ``index`` of ``function`` decodes now (``None``: not on the bus)."""
        mapping = self._mapped.get((self.slot_of(function), index))
        return mapping.base if mapping is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    # -- snapshots (vmmkit.state.Snapshottable) ------------------------------------------------

    state_version: ClassVar[int] = 1

    def save_state(self) -> dict[str, Any]:
        """The configuration address register and the host bridge's configuration space; the
        functions save their own, as placed devices of their own."""
        from vmmkit.state import pack_bytes

        with self._lock:
            return {"config_address": self.config_address,
                    "host_bridge": pack_bytes(self.host_bridge.config.save_registers())}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        from vmmkit.state import field, int_field, unpack_bytes

        what = f"pci segment {self.segment}"
        address = int_field(state, "config_address", what, 0, 0xFFFF_FFFF)
        bridge = unpack_bytes(field(state, "host_bridge", str, what), f"{what}.host_bridge",
                              len(self.host_bridge.config.save_registers()))
        with self._lock:
            self.config_address = address
            self.host_bridge.config.restore_registers(bridge)

    def reset(self) -> None:
        """The host bridge and the address register; functions reset through their own
        placed devices."""
        self.config_address = 0
        self.host_bridge.reset()

    def describe_acpi(self, placed: PlacedDevice, scope: AcpiScope) -> None:
        """A PCI Express root bridge (``PNP0A08``, ``_CID`` ``PNP0A03``): ``_SEG``, ``_BBN``,
        ``_CRS`` with the bus range, the configuration ports and the I/O, MMIO32 and MMIO64
        windows, and a ``_PRT`` for INTx; plus a ``PNP0C02`` motherboard resource claiming the
        ECAM window, since Linux accepts an MCFG area only if firmware also reserves it."""
        from vmmkit.acpi import aml

        first_bus, last_bus = self.bus_range
        resources: list[aml.AmlObject] = [aml.word_bus_number(first_bus, last_bus)]
        if placed.pio is not None:
            base, size = placed.pio
            resources.append(aml.Io(base, base, 1, size))
        if self.io is not None:
            resources.append(aml.word_io(self.io.start, self.io.end - 1))
        if self.mmio32 is not None:
            resources.append(aml.dword_memory(self.mmio32.start, self.mmio32.end - 1))
        if self.mmio64 is not None:
            resources.append(aml.qword_memory(self.mmio64.start, self.mmio64.end - 1))
        extra: list[aml.Term] = [
            aml.Name("_CID", aml.EisaId("PNP0A03")),
            aml.Name("_SEG", self.segment),
            aml.Name("_BBN", first_bus),
        ]
        routes = self.intx_routes()
        if routes:
            # _PRT entries: {address (slot << 16 | any function), pin (0 = INTA), source 0 (a
            # GSI), GSI}; the OS makes such lines level-triggered, active low, as PCI INTx is.
            extra.append(aml.Name("_PRT", aml.Package(
                [aml.Package([(slot << 16) | 0xFFFF, pin - 1, 0, gsi]) for slot, pin, gsi in routes])))
        if self.hotplug:
            from vmmkit.pci.hotplug import slot_terms

            extra += slot_terms()
        name = segment_name(self.segment)
        scope.add(aml.simple_device(name, aml.EisaId("PNP0A08"), self.segment, resources, *extra))
        if self.ecam is not None:
            index = scope.next_index("pci-ecam-reservation")
            scope.add(aml.simple_device("MBRD" if index == 0 else f"MBR{index:X}", aml.EisaId("PNP0C02"),
                                        index, [aml.Memory32Fixed(self.ecam.start, self.ecam.size)]))

    def describe_fdt(self, placed: PlacedDevice, fdt: FdtWriter) -> None:
        """A ``pci-host-ecam-generic`` bridge (Documentation/devicetree/bindings/pci/
        host-generic-pci.yaml), as QEMU's virt machine writes it: the ECAM window, the bus
        range, the MMIO windows in ``ranges`` (32-bit non-prefetchable, 64-bit), and an
        ``interrupt-map`` of the INTx routes (level-triggered), and an ``msi-map`` to the platform's
        MSI controller if it has one (the requester IDs as device IDs, as :func:`requester_id`)."""
        if self.ecam is None:
            return
        fdt.begin_node(f"pcie@{self.ecam.start:x}")
        fdt.property_strings("compatible", "pci-host-ecam-generic")
        fdt.property_string("device_type", "pci")
        fdt.property_reg(self.ecam.start, self.ecam.size)
        first_bus, last_bus = self.bus_range
        fdt.property("bus-range", _cells(first_bus, last_bus))
        fdt.property_u32("linux,pci-domain", self.segment)
        fdt.property_u32("#address-cells", 3)
        fdt.property_u32("#size-cells", 2)
        fdt.property_u32("#interrupt-cells", 1)
        ranges = b""
        for window, space in ((self.mmio32, _FDT_MEM32), (self.mmio64, _FDT_MEM64)):
            if window is not None:
                ranges += _cells(space, *_split64(window.start), *_split64(window.start), *_split64(window.size))
        fdt.property("ranges", ranges)
        routes = self.intx_routes()
        if routes:
            fdt.property("interrupt-map-mask", _cells(0xF800, 0, 0, 7))
            fdt.property("interrupt-map", b"".join(
                _cells(slot << 11, 0, 0, pin) + fdt.interrupt_specifier(gsi, edge=False)
                for slot, pin, gsi in routes))
        fdt.property_msi_map(requester_id(self.segment, 0, 0), 1 << 16)
        fdt.property("dma-coherent", b"")
        fdt.end_node()

    def describe(self) -> Mapping[str, Any]:
        return {
            "segment": self.segment,
            "functions": {bdf_string(self.segment, 0, slot): entry.function.name
                          for slot, entry in sorted(self._slots.items())},
        }


class PciConfigIo:
    """Configuration mechanism #1: ports 0xCF8-0xCFF, on the port-I/O bus."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset == 0 and size == 4:
            return self.root.config_address.to_bytes(4, "little")
        value = _ones(size)
        if 4 <= offset and offset + size <= CONFIG_IO_SIZE and size in (1, 2, 4):
            target = self._target(offset - 4)
            if target is not None:
                value = self.root.config_read(*target, size)
        return (value & _ones(size)).to_bytes(size, "little") if size <= 8 else b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        if offset == 0 and size == 4:
            self.root.config_address = value & _CONFIG_ADDRESS_MASK
        elif 4 <= offset and offset + size <= CONFIG_IO_SIZE and size in (1, 2, 4):
            target = self._target(offset - 4)
            if target is not None:
                self.root.config_write(*target, size, value)

    def _target(self, lane: int) -> tuple[int, int, int] | None:
        address = self.root.config_address
        if not address & _CONFIG_ENABLE:
            return None
        return (address >> 16) & 0xFF, (address >> 8) & 0xFF, (address & 0xFC) + lane


class PciEcam:
    """The enhanced configuration access mechanism: a memory window, 4 KiB per function."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        value = _ones(size)
        if size in (1, 2, 4) and offset >= 0:
            value = self.root.config_read(*_ecam_decode(offset), size)
        return (value & _ones(size)).to_bytes(size, "little") if size <= 8 else b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if len(data) in (1, 2, 4) and offset >= 0:
            self.root.config_write(*_ecam_decode(offset), len(data), int.from_bytes(data, "little"))


#: ``ranges`` space codes of the PCI bus binding (phys.hi): 32-bit and 64-bit memory.
_FDT_MEM32 = 0x0200_0000
_FDT_MEM64 = 0x0300_0000


def _cells(*values: int) -> bytes:
    return b"".join(value.to_bytes(4, "big") for value in values)


def _split64(value: int) -> tuple[int, int]:
    return value >> 32, value & 0xFFFF_FFFF


def _ecam_decode(offset: int) -> tuple[int, int, int]:
    return offset >> _ECAM_BUS_SHIFT, (offset >> 12) & 0xFF, offset & 0xFFF


def _allocator(window: MemoryRange | None, name: str) -> AddressAllocator | None:
    if window is None or window.size <= 0:
        return None
    return AddressAllocator(window.start, window.size, name)


# -- the device manager's side ---------------------------------------------------------------


def create_root(host: DeviceHost, segment: int, windows: SegmentWindows) -> tuple[PciRoot, PlacedDevice]:
    """A root complex for ``segment`` over ``windows`` (its share of the layout's), with its
    configuration windows on the buses: the 0xCF8 ports for segment 0 where the architecture has
    port I/O (``layout.pio``), and its ECAM window."""
    layout = host.layout
    if layout.pci_ecam is None and layout.pio is None:
        raise DeviceError("this architecture's layout has no PCI configuration window")
    if layout.pci_mmio32 is None and layout.pci_mmio64 is None:
        raise DeviceError("this architecture's layout has no PCI MMIO window")
    if windows.ecam is None and segment:
        raise DeviceError(f"PCI segment {segment} needs an ECAM window (this architecture has none to share)")
    # Segment 0's 64-bit window is the device manager's, shared with device memory (virtio-pmem).
    root = PciRoot(mmio_bus=host.mmio_bus, pio_bus=host.pio_bus, mmio32=windows.mmio32,
                   mmio64=windows.mmio64, io=windows.io, ecam=windows.ecam, segment=segment,
                   alloc64=host.mmio64_allocator if segment == 0 else None)
    pio = mmio = None
    if layout.pio is not None and segment == 0:
        host.pio_bus.insert(PciConfigIo(root), CONFIG_ADDRESS_PORT, CONFIG_IO_SIZE)
        pio = (CONFIG_ADDRESS_PORT, CONFIG_IO_SIZE)
    if windows.ecam is not None:
        host.mmio_bus.insert(PciEcam(root), windows.ecam.start, windows.ecam.size)
        mmio = (windows.ecam.start, windows.ecam.size)
    placed = PlacedDevice(root, DeviceRequest("pci-host", f"_pci{segment}"), PciRoot.kind,
                          pio=pio, mmio=mmio, properties={"segment": segment}, transport="pci")
    log.debug("pci.root_created", segment=segment, ecam=mmio, config_io=pio)
    return root, placed


def place_function(host: DeviceHost, function: PciFunction, request: DeviceRequest, *,
                   transport: str = "pci") -> PlacedDevice:
    """Plug ``function`` into the segment and slot ``request`` asks for (else the lowest free
    slot), with INTA on a shared line. ``properties["bdf"]`` is its address, ``"0000:00:NN.0"``."""
    root = host.pci_segment(request.pci_segment)
    slot = root.add_function(function, request.pci_slot)
    pin = root.connect_intx(function, host.allocate_irq)
    function.connect_intx(pin, pin.gsi if pin is not None else None)
    bdf = bdf_string(root.segment, 0, slot)
    bars = {index: (root.bar_base(function, index) or 0, bar.size) for index, bar in function.config.bars.items()}
    log.debug("device.placed", id=request.id, transport=transport, bdf=bdf)
    return PlacedDevice(
        function, request, function.kind, irq=pin.gsi if pin is not None else None,
        properties={
            "bdf": bdf,
            "segment": root.segment,
            "slot": slot,
            "function": 0,
            "pin": PIN_INTA if pin is not None else PIN_NONE,
            "bars": bars,
            **function.placement_properties(),
        },
        transport=transport,
    )


def remove_function(host: DeviceHost, placed: PlacedDevice) -> None:
    """Unplug a function placed by :func:`place_function`: its BARs leave the bus, its
    windows are freed, its INTA is lowered."""
    root = host.pci_segment(int(placed.properties.get("segment", 0)))
    root.remove_function(int(placed.properties["slot"]))
