"""A type-0 PCI configuration space: registers, write masks, BARs and the capability list.

Every byte has a write mask (which bits the guest may change) and a write-1-to-clear mask, as
in QEMU's ``PCIDevice.wmask``/``w1cmask`` and Cloud Hypervisor's ``PciConfiguration``: a guest
write becomes ``new = (old & ~wmask) | (value & wmask)``, then ``new &= ~(value & w1cmask)``.
Read-only fields therefore stay read-only whatever the guest writes.

BAR sizing needs no special case: a BAR's write mask covers only the address bits above its
size, so writing all ones and reading back yields the size mask with the type bits, which is
what ``__pci_read_base`` in Linux's drivers/pci/probe.c expects.

The device-side setters (:meth:`PciConfigSpace.set`, :meth:`add_bar`, :meth:`add_capability`,
...) also record the power-on value that :meth:`PciConfigSpace.reset` restores. Offsets and
sizes given by the guest are checked here: outside the space, crossing a dword or of a size
other than 1, 2 or 4, a read returns all ones and a write does nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from attrs import frozen

#: Offsets in the type-0 header.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A  #: subclass
CLASS_BASE = 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
NUM_BARS = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

#: Command register bits.
COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
_COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
)

#: Status register bits.
STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010
#: Error bits the guest clears by writing 1 (parity, target/master aborts, SERR).
_STATUS_W1C = 0xF900

#: BAR low bits (linux/pci_regs.h).
BAR_SPACE_IO = 0x01
BAR_MEM_TYPE_64 = 0x04
BAR_MEM_PREFETCH = 0x08
BAR_IO_MASK = 0xFFFF_FFFC
BAR_MEM_MASK = 0xFFFF_FFF0

#: Header types.
HEADER_TYPE_NORMAL = 0x00
HEADER_TYPE_MULTIFUNCTION = 0x80

#: Capability IDs.
CAP_ID_MSI = 0x05
CAP_ID_VNDR = 0x09
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

#: Capabilities live between the end of the header and the end of the legacy 256 bytes.
FIRST_CAPABILITY = 0x40
LEGACY_CONFIG_SIZE = 0x100
ECAM_CONFIG_SIZE = 0x1000

#: I/O BARs decode 16 bits (the x86 port space); the upper bits read as zero.
_IO_DECODE_LIMIT = 0x1_0000

#: Interrupt pins as the Interrupt Pin register encodes them.
PIN_NONE = 0
PIN_INTA = 1


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@frozen
class PciBar:
    """One base address register: its index (0-5; a 64-bit BAR also uses ``index + 1``),
    size (a power of two: at least 16 bytes for memory, 4 for I/O) and kind."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    def __attrs_post_init__(self) -> None:
        last = self.index + (1 if self.kind is BarKind.MEM64 else 0)
        if not 0 <= self.index or last >= NUM_BARS:
            raise ValueError(f"BAR {self.index} ({self.kind.value}) does not fit in BAR0-BAR5")
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR {self.index} size {self.size:#x} is not a power of two >= {minimum}")
        if self.kind is BarKind.IO and self.size > 256:
            raise ValueError(f"I/O BAR {self.index} is larger than 256 ports")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ValueError(f"32-bit BAR {self.index} is larger than 2 GiB")
        if self.kind is BarKind.IO and self.prefetchable:
            raise ValueError("an I/O BAR cannot be prefetchable")

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return BAR_SPACE_IO
        bits = BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return bits | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def address_limit(self) -> int:
        """One past the highest address the BAR can decode."""
        if self.kind is BarKind.IO:
            return _IO_DECODE_LIMIT
        return 1 << (64 if self.kind is BarKind.MEM64 else 32)


class PciConfigSpace:
    """The configuration space of one type-0 function (256 bytes, or 4 KiB for PCIe/ECAM)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        subclass: int,
        prog_if: int = 0,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        multifunction: bool = False,
        size: int = LEGACY_CONFIG_SIZE,
    ) -> None:
        if size not in (LEGACY_CONFIG_SIZE, ECAM_CONFIG_SIZE):
            raise ValueError(f"configuration space size must be 256 or 4096, not {size}")
        self.size = size
        self._regs = bytearray(size)
        self._defaults = bytearray(size)
        self._wmask = bytearray(size)
        self._w1cmask = bytearray(size)
        self.bars: dict[int, PciBar] = {}
        self._last_capability: tuple[int, int] | None = None  # (offset, length)
        self.set(VENDOR_ID, 2, vendor_id)
        self.set(DEVICE_ID, 2, device_id)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_PROG, 1, prog_if)
        self.set(CLASS_DEVICE, 1, subclass)
        self.set(CLASS_BASE, 1, class_code)
        self.set(HEADER_TYPE, 1, HEADER_TYPE_MULTIFUNCTION if multifunction else HEADER_TYPE_NORMAL)
        self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set(SUBSYSTEM_ID, 2, subsystem_id)
        self.set_writable(COMMAND, 2, _COMMAND_WRITABLE)
        self.set_w1c(STATUS, 2, _STATUS_W1C)
        self.set_writable(CACHE_LINE_SIZE, 1, 0xFF)
        self.set_writable(INTERRUPT_LINE, 1, 0xFF)

    # -- guest access ------------------------------------------------------------------------

    def valid_access(self, offset: int, size: int) -> bool:
        """Whether a guest access is one the space answers: 1, 2 or 4 bytes inside the space
        that do not cross a dword (a PCI configuration request has byte enables in one dword)."""
        return size in (1, 2, 4) and 0 <= offset and offset + size <= self.size and (offset & 3) + size <= 4

    def read(self, offset: int, size: int) -> int:
        """A guest read; all ones when :meth:`valid_access` says no."""
        if not self.valid_access(offset, size):
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
        return int.from_bytes(self._regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write through the write masks; ignored when :meth:`valid_access` says no."""
        if not self.valid_access(offset, size):
            return
        regs, wmask, w1c = self._regs, self._wmask, self._w1cmask
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            pos = offset + i
            new = (regs[pos] & ~wmask[pos]) | (byte & wmask[pos])
            regs[pos] = new & ~(byte & w1c[pos]) & 0xFF

    # -- device side -------------------------------------------------------------------------

    def get(self, offset: int, size: int) -> int:
        """The current value of a field (no access checks: for the device model)."""
        return int.from_bytes(self._regs[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int, *, default: bool = True) -> None:
        """Set a field regardless of its write mask; with ``default`` it is also the value
        :meth:`reset` restores (use ``default=False`` for run-time state such as
        the interrupt status bit)."""
        self._check_field(offset, size)
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._regs[offset : offset + size] = data
        if default:
            self._defaults[offset : offset + size] = data

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self._check_field(offset, size)
        self._wmask[offset : offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self._check_field(offset, size)
        self._w1cmask[offset : offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def writable(self, offset: int, size: int) -> int:
        return int.from_bytes(self._wmask[offset : offset + size], "little")

    def save_registers(self) -> bytes:
        """The configuration space as it is now (a snapshot)."""
        return bytes(self._regs)

    def restore_registers(self, data: bytes) -> None:
        """Take :meth:`save_registers`'s bytes (the same layout: the function is built from
        the same configuration)."""
        if len(data) != len(self._regs):
            raise ValueError(f"a configuration space of {len(self._regs)} bytes, not {len(data)}")
        self._regs[:] = data

    def reset(self) -> None:
        """Back to the power-on values (what the VMM, acting as firmware, programmed)."""
        self._regs[:] = self._defaults

    def _check_field(self, offset: int, size: int) -> None:
        if size <= 0 or offset < 0 or offset + size > self.size:
            raise ValueError(f"field {offset:#x}+{size} is outside the {self.size}-byte space")

    # -- header fields -----------------------------------------------------------------------

    @property
    def vendor_id(self) -> int:
        return self.get(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.get(DEVICE_ID, 2)

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    @property
    def interrupt_pin(self) -> int:
        return self.get(INTERRUPT_PIN, 1)

    def set_interrupt(self, line: int, pin: int = PIN_INTA) -> None:
        """The legacy interrupt: ``line`` (guest-writable, informational) and ``pin``."""
        self.set(INTERRUPT_LINE, 1, line)
        self.set(INTERRUPT_PIN, 1, pin)

    def set_interrupt_status(self, asserted: bool) -> None:
        """The Interrupt Status bit (read-only to the guest): an INTx message is pending."""
        status = self.get(STATUS, 2)
        status = status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT
        self.set(STATUS, 2, status, default=False)

    # -- BARs ------------------------------------------------------------------------------

    def add_bar(self, bar: PciBar, address: int = 0) -> None:
        """Declare a BAR (and its power-on address, which :meth:`set_bar_address` may change)."""
        used = {i for b in self.bars.values() for i in _bar_registers(b)}
        if used & set(_bar_registers(bar)):
            raise ValueError(f"BAR {bar.index} overlaps a BAR already declared")
        self.bars[bar.index] = bar
        reg = BAR0 + 4 * bar.index
        addr_mask = BAR_IO_MASK if bar.is_io else BAR_MEM_MASK
        low_mask = addr_mask & ~(bar.size - 1) & 0xFFFF_FFFF
        if bar.is_io:
            low_mask &= _IO_DECODE_LIMIT - 1
        self.set_writable(reg, 4, low_mask)
        if bar.kind is BarKind.MEM64:
            self.set_writable(reg + 4, 4, ~((bar.size - 1) >> 32) & 0xFFFF_FFFF)
        self.set_bar_address(bar.index, address)

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` (device side: firmware's assignment, kept across reset)."""
        bar = self.bars[index]
        if address % bar.size or address < 0 or address + bar.size > bar.address_limit:
            raise ValueError(f"BAR {index} cannot decode {address:#x}+{bar.size:#x}")
        reg = BAR0 + 4 * index
        self.set(reg, 4, (address & 0xFFFF_FFFF) | bar.flags)
        if bar.kind is BarKind.MEM64:
            self.set(reg + 4, 4, address >> 32)

    def bar_address(self, index: int) -> int:
        """The address BAR ``index`` holds now, as the guest programmed it."""
        bar = self.bars[index]
        reg = BAR0 + 4 * index
        low = self.get(reg, 4) & (BAR_IO_MASK if bar.is_io else BAR_MEM_MASK)
        if bar.kind is BarKind.MEM64:
            return low | (self.get(reg + 4, 4) << 32)
        return low

    def bar_decoding(self, index: int) -> bool:
        """Whether the command register lets BAR ``index`` decode (I/O or memory enable)."""
        bit = COMMAND_IO if self.bars[index].is_io else COMMAND_MEMORY
        return bool(self.command & bit)

    def bar_at(self, offset: int) -> PciBar | None:
        """The BAR whose register (either half of a 64-bit one) holds config byte ``offset``."""
        if not BAR0 <= offset < BAR0 + 4 * NUM_BARS:
            return None
        reg = (offset - BAR0) // 4
        for bar in self.bars.values():
            if reg in _bar_registers(bar):
                return bar
        return None

    # -- capabilities ----------------------------------------------------------------------

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability and return its offset.

        ``body`` is what follows the two-byte header (ID, next pointer), which this fills in;
        ``writable`` is an optional per-byte write mask for ``body``. Capabilities are placed
        dword-aligned from 0x40 and must end within the first 256 bytes.
        """
        if writable is not None and len(writable) != len(body):
            raise ValueError("the write mask must be as long as the capability body")
        length = 2 + len(body)
        if self._last_capability is None:
            offset, link = FIRST_CAPABILITY, CAPABILITY_LIST
        else:
            last, last_len = self._last_capability
            offset, link = (last + last_len + 3) & ~3, last + 1
        if offset + length > LEGACY_CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#x} of {length} bytes does not fit")
        self.set(offset, 1, cap_id)
        self.set(offset + 1, 1, 0)
        if body:
            self.set(offset + 2, len(body), int.from_bytes(body, "little"))
        if writable:
            self._wmask[offset + 2 : offset + length] = writable
        self.set(link, 1, offset)
        self.set(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self._last_capability = (offset, length)
        return offset

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """``(offset, id)`` of each capability, walking the list as a guest does (bounded)."""
        seen: set[int] = set()
        offset = self.get(CAPABILITY_LIST, 1) & ~3
        while offset >= FIRST_CAPABILITY and offset not in seen and len(seen) < 48:
            seen.add(offset)
            yield offset, self.get(offset, 1)
            offset = self.get(offset + 1, 1) & ~3


def _bar_registers(bar: PciBar) -> tuple[int, ...]:
    return (bar.index, bar.index + 1) if bar.kind is BarKind.MEM64 else (bar.index,)


def overlaps(offset: int, size: int, start: int, length: int) -> bool:
    """Whether the access ``offset+size`` touches the field ``start+length``."""
    return offset < start + length and start < offset + size
