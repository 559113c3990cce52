"""MSI-X: table, PBA, per-vector and function masking, and how vectors reach the backend."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from pci_support import FakeVm

from vmmkit.pci import config as c
from vmmkit.pci.config import PciConfigSpace
from vmmkit.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, MsixTable, backend_routes_msi

ADDRESS = 0xFEE0_1000
DATA = 0x4041


def make(vm: FakeVm, vectors: int = 3, gsis: bool = True) -> tuple[MsixTable, PciConfigSpace, int]:
    counter = itertools.count(24)
    table = MsixTable(vm, vectors, (lambda: next(counter)) if gsis else None)
    space = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF, subclass=0)
    cap = table.add_capability(space, table_bar=0, table_offset=0x8000, pba_bar=0, pba_offset=0x48000)
    return table, space, cap


def set_control(table: MsixTable, space: PciConfigSpace, cap: int, value: int) -> None:
    space.write(cap + 2, 2, value)
    table.config_written(space, cap + 2, 2)


def program(table: MsixTable, vector: int, address: int = ADDRESS, data: int = DATA,
            masked: bool = False) -> None:
    base = vector * 16
    table.write_table(base, (address | (data << 64)).to_bytes(12, "little")[:8])
    table.write_table(base + 8, data.to_bytes(4, "little"))
    table.write_table(base + 12, int(masked).to_bytes(4, "little"))


def pba(table: MsixTable) -> int:
    return int.from_bytes(table.read_pba(0, 8), "little")


def test_capability_layout() -> None:
    table, space, cap = make(FakeVm(), vectors=5)
    assert space.read(cap, 1) == c.CAP_ID_MSIX
    assert space.read(cap + 2, 2) == 4  # table size N-1, disabled, unmasked
    assert space.read(cap + 4, 4) == 0x8000  # offset | BIR 0
    assert space.read(cap + 8, 4) == 0x48000
    space.write(cap + 2, 2, 0xFFFF)
    assert space.read(cap + 2, 2) == 0xC004  # only enable and function mask are writable
    space.write(cap + 4, 4, 0)
    assert space.read(cap + 4, 4) == 0x8000


def test_power_on_table() -> None:
    table, _, _ = make(FakeVm(), vectors=2)
    assert table.read_table(0, 16) == bytes(12) + b"\x01\x00\x00\x00"
    assert table.read_table(16, 16) == bytes(12) + b"\x01\x00\x00\x00"
    assert table.read_table(32, 4) == bytes(4)  # past the table
    assert pba(table) == 0
    assert all(table.masked(i) for i in range(2))


def test_entry_write_masks() -> None:
    table, _, _ = make(FakeVm())
    table.write_table(0, b"\xff" * 8)
    table.write_table(8, b"\xff" * 8)
    assert table.read_table(0, 16) == b"\xfc" + b"\xff" * 11 + b"\x01\x00\x00\x00"
    table.write_table(2, b"\x00\x00")  # not a dword: ignored
    table.write_table(4, b"\x00" * 8)  # qword not qword-aligned: ignored
    table.write_table(1, b"\x00" * 4)
    assert table.read_table(0, 8) == b"\xfc" + b"\xff" * 7
    table.write_table(0, b"\x00" * 8)
    assert table.read_table(0, 4) == bytes(4)


def test_irqfd_backend_routes_each_unmasked_vector(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    assert backend_routes_msi(vm)
    assert [v.gsi for v in table.vectors] == [24, 25, 26]
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 1)
    assert vm.msi_routes == {25: (ADDRESS, DATA)}
    assert set(vm.irqfds) == {25}
    table.trigger(1)
    assert vm.delivered() == [(ADDRESS, DATA)]
    table.trigger(0)  # still masked: pending, nothing delivered
    assert vm.delivered() == []
    assert pba(table) == 0b001
    program(table, 1, masked=True)
    assert 25 not in vm.irqfds


def test_pending_bit_delivers_on_unmask(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 2, masked=True)
    table.trigger(2)
    table.trigger(2)
    assert pba(table) == 0b100 and vm.delivered() == []
    table.write_table(2 * 16 + 12, b"\x00\x00\x00\x00")  # unmask
    assert vm.delivered() == [(ADDRESS, DATA)]  # one message for any number of pending events
    assert pba(table) == 0


def test_function_mask(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    set_control(table, space, cap, CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
    program(table, 0)
    program(table, 1)
    assert table.masked(0) and vm.irqfds == {}
    table.trigger(0)
    assert pba(table) == 0b01 and vm.delivered() == []
    set_control(table, space, cap, CONTROL_ENABLE)
    assert vm.delivered() == [(ADDRESS, DATA)]
    assert pba(table) == 0
    assert set(vm.irqfds) == {24, 25}


def test_disabled_msix_masks_everything(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    program(table, 0)
    assert table.masked(0) and vm.irqfds == {}
    set_control(table, space, cap, CONTROL_ENABLE)
    assert not table.masked(0)
    set_control(table, space, cap, 0)
    assert table.masked(0) and vm.irqfds == {}


def test_reprogramming_an_unmasked_vector_updates_the_route(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 0)
    table.write_table(8, (0x4055).to_bytes(4, "little"))
    assert vm.msi_routes[24] == (ADDRESS, 0x4055)
    table.trigger(0)
    assert vm.delivered() == [(ADDRESS, 0x4055)]


def test_signal_msi_without_irqfds() -> None:
    vm = FakeVm(irqfd=False)
    table, space, cap = make(vm)
    assert not backend_routes_msi(vm)
    assert all(v.gsi is None for v in table.vectors)  # no GSI taken
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 0)
    table.trigger(0)
    assert vm.msis == [(ADDRESS, DATA)]
    assert vm.calls == []  # no route, no irqfd


def test_out_of_gsis_falls_back_to_signal_msi(vm: FakeVm) -> None:
    table = MsixTable(vm, 2, lambda: None)
    space = PciConfigSpace(vendor_id=1, device_id=2, class_code=0xFF, subclass=0)
    cap = table.add_capability(space, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x800)
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 1)
    table.trigger(1)
    assert vm.msis == [(ADDRESS, DATA)]


def test_trigger_out_of_range_is_ignored(vm: FakeVm) -> None:
    table, _, _ = make(vm)
    table.trigger(-1)
    table.trigger(3)
    assert pba(table) == 0


def test_pba_layout_for_many_vectors(vm: FakeVm) -> None:
    table = MsixTable(vm, 70, None)
    for index in (0, 63, 64, 69):
        table.trigger(index)
    assert table.read_pba(0, 8) == (1 | 1 << 63).to_bytes(8, "little")
    assert table.read_pba(8, 8) == (1 | 1 << 5).to_bytes(8, "little")
    assert table.read_pba(16, 8) == bytes(8)
    table.write_pba(0, b"\x00" * 8)  # read-only
    assert table.read_pba(0, 1) == b"\x01"


def test_reset(vm: FakeVm) -> None:
    table, space, cap = make(vm)
    set_control(table, space, cap, CONTROL_ENABLE)
    program(table, 0)
    program(table, 1, masked=True)
    table.trigger(1)
    table.reset()
    assert not table.enabled and pba(table) == 0
    assert table.read_table(0, 16) == bytes(12) + b"\x01\x00\x00\x00"
    assert vm.irqfds == {}
    table.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["table", "pba", "control", "trigger"]), st.integers(-16, 0x900),
                          st.sampled_from([0, 1, 2, 4, 8, 16]), st.integers(0, (1 << 128) - 1)), max_size=60))
def test_hostile_table_accesses_never_raise(ops: list[tuple[str, int, int, int]]) -> None:
    vm = FakeVm()
    table, space, cap = make(vm, vectors=33)
    for kind, offset, size, value in ops:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if kind == "table":
            table.write_table(offset, data)
            assert len(table.read_table(offset, size)) == size
        elif kind == "pba":
            table.write_pba(offset, data)
            assert len(table.read_pba(offset, size)) == size
        elif kind == "control":
            set_control(table, space, cap, value & 0xFFFF)
        else:
            table.trigger(offset)
        vm.delivered()
    # the backend's view is consistent: exactly the effectively unmasked vectors have irqfds
    unmasked = {v.gsi for v in table.vectors if not v.masked}
    assert set(vm.irqfds) == unmasked
    table.close()
