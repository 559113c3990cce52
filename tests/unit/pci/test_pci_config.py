"""The type-0 configuration space: read-only fields, write masks, BAR sizing as Linux's
``__pci_read_base`` does it, the capability list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pci_support import ConfigAccess, Function

from vmmkit.pci import config as c
from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace


def make_space(size: int = c.LEGACY_CONFIG_SIZE) -> PciConfigSpace:
    return PciConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0x02, subclass=0x00, prog_if=0x01,
                          revision=3, subsystem_vendor_id=0xABCD, subsystem_id=0x2468, size=size)


class DirectAccess(ConfigAccess):
    """Config accesses straight into one space (what a root does after decoding)."""

    def __init__(self, space: PciConfigSpace) -> None:
        self.space = space

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int) -> int:
        return self.space.read(reg, size)

    def write(self, bus: int, dev: int, fn: int, reg: int, size: int, value: int) -> None:
        self.space.write(reg, size, value)


def test_header_fields() -> None:
    space = make_space()
    assert space.read(0x00, 4) == 0x5678_1234
    assert space.read(0x08, 4) == 0x0200_0103  # class 02, subclass 00, prog-if 01, revision 3
    assert space.read(0x0E, 1) == 0
    assert space.read(0x2C, 4) == 0x2468_ABCD
    assert space.read(0x34, 1) == 0
    assert space.read(0x06, 2) & c.STATUS_CAP_LIST == 0


def test_read_only_fields_stay_read_only() -> None:
    space = make_space()
    before = bytes(space.read(offset, 1) for offset in range(256))
    for offset in range(0, 256, 4):
        space.write(offset, 4, 0xFFFF_FFFF)
    writable = {0x04, 0x05, 0x0C, 0x3C}  # command, cache line size, interrupt line
    for offset in range(256):
        if offset not in writable:
            assert space.read(offset, 1) == before[offset], hex(offset)
    assert space.read(c.COMMAND, 2) == 0x0547
    assert space.read(c.CACHE_LINE_SIZE, 1) == 0xFF
    assert space.read(c.INTERRUPT_LINE, 1) == 0xFF


def test_status_error_bits_are_write_one_to_clear() -> None:
    space = make_space()
    space.set(c.STATUS, 2, 0xF900 | c.STATUS_CAP_LIST, default=False)
    space.write(c.STATUS, 2, 0x2000)  # clear "received master abort" only
    assert space.read(c.STATUS, 2) == 0xD900 | c.STATUS_CAP_LIST
    space.write(c.STATUS, 2, 0xFFFF)
    assert space.read(c.STATUS, 2) == c.STATUS_CAP_LIST  # capability bit is read-only


def test_byte_and_word_writes_merge_into_the_dword() -> None:
    space = make_space()
    space.write(c.COMMAND, 1, 0x06)
    space.write(c.COMMAND + 1, 1, 0x04)
    assert space.read(c.COMMAND, 2) == 0x0406
    assert space.read(c.COMMAND + 1, 1) == 0x04


@pytest.mark.parametrize(("offset", "size"),
                         [(0x3F, 2), (0x3E, 4), (0x100, 1), (-1, 1), (0, 3), (0, 8), (0xFE, 4)])
def test_bad_accesses_read_all_ones_and_write_nothing(offset: int, size: int) -> None:
    space = make_space()
    space.add_bar(PciBar(0, 0x1000, BarKind.MEM32), 0xC000_0000)
    snapshot = [space.read(i, 1) for i in range(256)]
    assert space.read(offset, size) == (1 << (8 * size)) - 1
    space.write(offset, size, 0)
    assert [space.read(i, 1) for i in range(256)] == snapshot


@pytest.mark.parametrize(
    ("bar", "address"),
    [
        (PciBar(0, 0x1000, BarKind.MEM32), 0xC000_1000),
        (PciBar(1, 0x10, BarKind.MEM32, prefetchable=True), 0xC000_0010),
        (PciBar(2, 0x8_0000, BarKind.MEM64), 0x10_0008_0000),
        (PciBar(0, 8 << 30, BarKind.MEM64, prefetchable=True), 0x20_0000_0000),
        (PciBar(4, 0x20, BarKind.IO), 0x1020),
        (PciBar(5, 4, BarKind.IO), 0xFFFC),
    ],
)
def test_bar_sizing_as_linux_probes_it(bar: PciBar, address: int) -> None:
    space = make_space()
    space.add_bar(bar, address)
    space.set(c.COMMAND, 2, c.COMMAND_IO | c.COMMAND_MEMORY)
    fn = Function(DirectAccess(space), 1)
    probed = fn.read_bases()
    assert list(probed) == [bar.index]
    found = probed[bar.index]
    assert (found.size, found.address) == (bar.size, address)
    assert found.io == bar.is_io
    assert found.mem64 == (bar.kind is BarKind.MEM64)
    assert found.prefetch == bar.prefetchable
    # __pci_read_base restores the BAR and the command register
    assert space.bar_address(bar.index) == address
    assert space.read(c.COMMAND, 2) == c.COMMAND_IO | c.COMMAND_MEMORY


def test_sizing_reads_back_the_size_mask_with_type_bits() -> None:
    space = make_space()
    space.add_bar(PciBar(0, 0x8_0000, BarKind.MEM64, prefetchable=True), 0x10_0000_0000)
    space.write(0x10, 4, 0xFFFF_FFFF)
    space.write(0x14, 4, 0xFFFF_FFFF)
    assert space.read(0x10, 4) == 0xFFF8_0000 | 0x0C
    assert space.read(0x14, 4) == 0xFFFF_FFFF
    space.add_bar(PciBar(2, 0x100, BarKind.IO), 0x2000)
    space.write(0x18, 4, 0xFFFF_FFFF)
    assert space.read(0x18, 4) == 0x0000_FF01  # 16-bit I/O decode: upper half reads as zero


def test_unimplemented_bars_and_rom_size_to_zero() -> None:
    space = make_space()
    space.add_bar(PciBar(2, 0x1000, BarKind.MEM32), 0xC000_0000)
    fn = Function(DirectAccess(space), 1)
    assert list(fn.read_bases()) == [2]
    space.write(c.ROM_ADDRESS, 4, 0xFFFF_FFFF)
    assert space.read(c.ROM_ADDRESS, 4) == 0


def test_bar_declarations_are_checked() -> None:
    with pytest.raises(ValueError):
        PciBar(5, 0x1000, BarKind.MEM64)  # needs BAR5 and BAR6
    with pytest.raises(ValueError):
        PciBar(0, 0x1800, BarKind.MEM32)
    with pytest.raises(ValueError):
        PciBar(0, 8, BarKind.MEM32)
    space = make_space()
    space.add_bar(PciBar(0, 0x1000, BarKind.MEM64))
    with pytest.raises(ValueError):
        space.add_bar(PciBar(1, 0x1000, BarKind.MEM32))  # the upper half of BAR0
    with pytest.raises(ValueError):
        space.set_bar_address(0, 0x800)  # not aligned to the size


def test_capability_list_is_linked_and_walkable() -> None:
    space = make_space()
    first = space.add_capability(c.CAP_ID_VNDR, bytes([4, 0xAA]))
    second = space.add_capability(c.CAP_ID_MSIX, bytes(10), bytes([0, 0xC0]) + bytes(8))
    third = space.add_capability(c.CAP_ID_VNDR, bytes([3]))
    assert (first, second, third) == (0x40, 0x44, 0x50)
    assert space.read(c.STATUS, 2) & c.STATUS_CAP_LIST
    assert list(space.capabilities()) == [(0x40, 0x09), (0x44, 0x11), (0x50, 0x09)]
    fn = Function(DirectAccess(space), 1)
    assert fn.find_capability(c.CAP_ID_MSIX) == 0x44
    assert fn.find_capability(c.CAP_ID_VNDR) == 0x40
    assert fn.find_capability(c.CAP_ID_VNDR, 0x40) == 0x50
    assert fn.find_capability(c.CAP_ID_VNDR, 0x50) == 0
    assert fn.find_capability(c.CAP_ID_EXP) == 0
    # the body is read-only except where the mask says; the list pointers are read-only
    space.write(0x40, 4, 0xFFFF_FFFF)
    assert space.read(0x40, 4) == 0xAA04_4409
    space.write(0x46, 2, 0xFFFF)
    assert space.read(0x46, 2) == 0xC000


def test_capabilities_must_fit_in_the_legacy_space() -> None:
    space = make_space()
    space.add_capability(c.CAP_ID_VNDR, bytes(0xB0))
    with pytest.raises(ValueError):
        space.add_capability(c.CAP_ID_VNDR, bytes(0x20))


def test_interrupt_line_and_pin() -> None:
    space = make_space()
    space.set_interrupt(11, c.PIN_INTA)
    assert space.read(c.INTERRUPT_LINE, 2) == 0x010B
    space.write(c.INTERRUPT_LINE, 2, 0x0405)
    assert space.read(c.INTERRUPT_LINE, 2) == 0x0105  # line is writable, pin is not


def test_reset_restores_power_on_values() -> None:
    space = make_space()
    space.add_bar(PciBar(0, 0x1000, BarKind.MEM32), 0xC000_0000)
    space.set(c.COMMAND, 2, c.COMMAND_MEMORY)
    space.write(0x10, 4, 0xD000_0000)
    space.write(c.COMMAND, 2, 0x0407)
    space.set_interrupt_status(True)
    space.reset()
    assert space.bar_address(0) == 0xC000_0000
    assert space.read(c.COMMAND, 2) == c.COMMAND_MEMORY
    assert not space.read(c.STATUS, 2) & c.STATUS_INTERRUPT


def test_ecam_sized_space_answers_extended_offsets() -> None:
    space = make_space(size=c.ECAM_CONFIG_SIZE)
    assert space.read(0x100, 4) == 0  # no extended capabilities
    assert space.read(0xFFC, 4) == 0
    assert space.read(0x1000, 1) == 0xFF


@given(st.lists(st.tuples(st.integers(-8, 0x1100), st.sampled_from([0, 1, 2, 3, 4, 8]),
                          st.integers(0, (1 << 64) - 1)), max_size=60))
def test_random_writes_never_raise_and_keep_read_only_bytes(writes: list[tuple[int, int, int]]) -> None:
    space = make_space()
    space.add_bar(PciBar(0, 0x8_0000, BarKind.MEM64), 0x10_0000_0000)
    space.add_bar(PciBar(2, 0x20, BarKind.IO), 0x1000)
    space.add_capability(c.CAP_ID_MSIX, bytes(10), bytes([0, 0xC0]) + bytes(8))
    ids = space.read(0, 4), space.read(8, 4), space.read(0x2C, 4), space.read(0x34, 1)
    for offset, size, value in writes:
        space.write(offset, size, value & ((1 << (8 * size)) - 1) if size else 0)
        result = space.read(offset, size)
        assert 0 <= result < 1 << (8 * size) if size else result == 0
    assert (space.read(0, 4), space.read(8, 4), space.read(0x2C, 4), space.read(0x34, 1)) == ids
    assert space.read(0x10, 4) & 0xF == c.BAR_MEM_TYPE_64
    assert space.read(0x18, 4) & 0x3 == c.BAR_SPACE_IO
    assert space.read(0x18, 4) >> 16 == 0
