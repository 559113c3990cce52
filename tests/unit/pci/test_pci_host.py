"""The root complex: 0xCF8/0xCFC and ECAM, empty slots, BAR placement and relocation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pci_support import LAYOUT, FakeMachine, FakeVm, Function

from vmmkit.arch import MemoryLayout
from vmmkit.errors import DeviceError
from vmmkit.memory import MemoryRange
from vmmkit.pci import config as c
from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import BarRegion, PciFunction
from vmmkit.pci.host import IntxPin, PciConfigIo, PciEcam, PciRoot, SharedIntx


class Recorder(PciFunction):
    """A function with the BARs it is given; remembers BAR accesses and (un)mappings."""

    def __init__(self, name: str, *bars: PciBar) -> None:
        space = PciConfigSpace(vendor_id=0x1B36, device_id=0x0005, class_code=0xFF, subclass=0)
        for bar in bars:
            space.add_bar(bar)
        super().__init__(name, space)
        self.events: list[tuple[str, int, int]] = []
        self.writes: list[tuple[int, int, bytes]] = []

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return bytes([index]) * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.writes.append((index, offset, data))

    def bar_mapped(self, index: int, base: int) -> None:
        self.events.append(("mapped", index, base))

    def bar_unmapped(self, index: int, base: int) -> None:
        self.events.append(("unmapped", index, base))


def region_at(machine: FakeMachine, addr: int, io: bool = False) -> object | None:
    found = (machine.pio_bus if io else machine.mmio_bus).lookup(addr)
    return None if found is None else found[1]


def test_root_is_created_once_and_placed(machine: FakeMachine) -> None:
    assert machine.pci_segments == {}
    root = machine.pci_segment()
    assert machine.pci_segment() is root
    assert machine.pci_segments == {0: root}
    hosts = [p for p in machine.devices if p.kind == "pci-host"]
    assert len(hosts) == 1
    host = hosts[0]
    assert host.device is root and host.id == "_pci0" and host.transport == "pci"
    assert host.pio == (0xCF8, 8)
    assert host.mmio == (LAYOUT.pci_ecam.start, LAYOUT.pci_ecam.size)  # type: ignore[union-attr]
    assert root.segment == 0 and root.bus_range == (0, 0)
    assert (root.mmio32, root.mmio64, root.io) == (LAYOUT.pci_mmio32, LAYOUT.pci_mmio64, LAYOUT.pio)
    assert isinstance(region_at(machine, 0xCF8, io=True), PciConfigIo)
    assert isinstance(region_at(machine, LAYOUT.pci_ecam.start), PciEcam)  # type: ignore[union-attr]
    with pytest.raises(DeviceError, match="segment 1 does not exist"):
        machine.pci_segment(1)
    with pytest.raises(DeviceError, match="cannot be removed"):
        machine.remove("_pci0")


def test_no_port_window_means_no_cf8(make_machine: Callable[..., FakeMachine]) -> None:
    import attrs

    arm = make_machine(layout=attrs.evolve(LAYOUT, pio=None))
    arm.pci_segment()
    assert region_at(arm, 0xCF8, io=True) is None
    assert arm.devices[0].pio is None


def test_layout_without_pci_is_refused(make_machine: Callable[..., FakeMachine]) -> None:
    bare = make_machine(layout=MemoryLayout(ram=LAYOUT.ram, device_mmio=LAYOUT.device_mmio))
    with pytest.raises(DeviceError):
        bare.pci_segment()


def test_host_bridge_and_empty_slots(machine: FakeMachine) -> None:
    machine.pci_segment()
    guest = machine.guest
    for ecam in (False, True):
        host = guest.function(0, ecam=ecam)
        assert host.read32(0) == 0x0D57_8086
        assert host.read16(0x0A) == 0x0600  # PCI_CLASS_BRIDGE_HOST
        assert host.read8(0x0E) == 0
        for dev in range(1, 32):
            assert guest.function(dev, ecam=ecam).read16(0) == 0xFFFF
            assert guest.function(dev, ecam=ecam).read32(0) == 0xFFFF_FFFF
        for fn in range(1, 8):
            assert Function(guest.ecam if ecam else guest.cf8, 0, fn).read32(0) == 0xFFFF_FFFF
        assert Function(guest.ecam if ecam else guest.cf8, 0, 0, bus=1).read32(0) == 0xFFFF_FFFF


def test_linux_type1_detection(machine: FakeMachine) -> None:
    """arch/x86/pci/direct.c pci_check_type1 + pci_sanity_check."""
    machine.pci_segment()
    cpu = machine.guest.cpu
    cpu.pio_write(0xCFB, b"\x01")
    tmp = cpu.pio_read(0xCF8, 4)
    cpu.pio_write(0xCF8, (0x8000_0000).to_bytes(4, "little"))
    assert int.from_bytes(cpu.pio_read(0xCF8, 4), "little") == 0x8000_0000
    cpu.pio_write(0xCF8, tmp)
    found = any(machine.guest.cf8.read(0, devfn >> 3, devfn & 7, 0x0A, 2) == 0x0600 for devfn in range(256))
    assert found


def test_cf8_details(machine: FakeMachine) -> None:
    machine.pci_segment()
    cpu = machine.guest.cpu
    cpu.pio_write(0xCF8, (0x8000_0003).to_bytes(4, "little"))
    assert cpu.pio_read(0xCF8, 4) == (0x8000_0000).to_bytes(4, "little")  # bits 1:0 read as zero
    cpu.pio_write(0xCF8, b"\x55\x55")  # not a 32-bit access: not the address register
    assert cpu.pio_read(0xCF8, 4) == (0x8000_0000).to_bytes(4, "little")
    assert cpu.pio_read(0xCF9, 1) == b"\xff"
    assert cpu.pio_read(0xCFC, 4) == (0x0D57_8086).to_bytes(4, "little")
    assert cpu.pio_read(0xCFE, 2) == (0x0D57).to_bytes(2, "little")
    assert cpu.pio_read(0xCFD, 1) == b"\x80"
    assert cpu.pio_read(0xCFE, 4) == b"\xff" * 4  # crosses the window's end
    cpu.pio_write(0xCF8, (0x0000_0000).to_bytes(4, "little"))  # enable bit clear
    assert cpu.pio_read(0xCFC, 4) == b"\xff" * 4


def test_both_mechanisms_give_the_same_answers(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    root.add_function(Recorder("a", PciBar(0, 0x1000, BarKind.MEM32), PciBar(2, 0x20, BarKind.IO)))
    guest = machine.guest
    for dev in (0, 1, 2):
        cf8, ecam = guest.function(dev), guest.function(dev, ecam=True)
        for size in (1, 2, 4):
            for reg in range(0, 256, size):
                expected = cf8.cfg.read(0, dev, 0, reg, size)
                assert ecam.cfg.read(0, dev, 0, reg, size) == expected, (dev, reg, size)


def test_slots(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    assert root.add_function(Recorder("a")) == 1
    assert root.add_function(Recorder("b"), 7) == 7
    assert root.add_function(Recorder("c")) == 2
    with pytest.raises(DeviceError, match="already used"):
        root.add_function(Recorder("d"), 7)
    with pytest.raises(DeviceError):
        root.add_function(Recorder("e"), 0)
    with pytest.raises(DeviceError):
        root.add_function(Recorder("e"), 32)
    for _ in range(28):
        root.add_function(Recorder("x"))
    with pytest.raises(DeviceError, match="slots"):
        root.add_function(Recorder("full"))
    assert machine.guest.function(31).read16(0) == 0x1B36


def test_bar_assignment_from_the_windows(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x4000, BarKind.MEM64), PciBar(2, 0x100, BarKind.MEM32),
                  PciBar(3, 0x40, BarKind.IO))
    root.add_function(fn)
    probed = machine.guest.function(1).read_bases()
    assert probed[0].mem64 and LAYOUT.pci_mmio64.contains(probed[0].address, 0x4000)  # type: ignore[union-attr]
    assert probed[0].address % 0x4000 == 0
    assert LAYOUT.pci_mmio32.contains(probed[2].address, 0x100)  # type: ignore[union-attr]
    assert probed[2].address % 0x1000 == 0  # memory BARs get at least a page
    assert probed[3].io and LAYOUT.pio.contains(probed[3].address, 0x40)  # type: ignore[union-attr]
    # decoding is enabled at power-on, as firmware leaves it; bus mastering is not
    assert machine.guest.function(1).read16(c.COMMAND) == c.COMMAND_IO | c.COMMAND_MEMORY
    for index, bar in probed.items():
        region = region_at(machine, bar.address, io=bar.io)
        assert isinstance(region, BarRegion) and region.index == index
    assert machine.guest.read(probed[2].address + 8, 4) == 0x0202_0202
    assert machine.guest.cpu.pio_read(probed[3].address, 1) == b"\x03"
    assert [e[0] for e in fn.events[:3]] == ["mapped"] * 3
    # each BAR probe turned decoding off and on again: unmapped and re-mapped in place
    assert {(e[1], e[2]) for e in fn.events} == {(i, b.address) for i, b in probed.items()}


def test_64bit_bar_falls_back_to_the_32bit_window(make_machine: Callable[..., FakeMachine]) -> None:
    import attrs

    small = make_machine(layout=attrs.evolve(LAYOUT, pci_mmio64=None))
    root = small.pci_segment()
    assert root is not None
    root.add_function(Recorder("a", PciBar(0, 0x8_0000, BarKind.MEM64)))
    bar = small.guest.function(1).read_bases()[0]
    assert bar.mem64 and LAYOUT.pci_mmio32.contains(bar.address, bar.size)  # type: ignore[union-attr]


def test_window_exhaustion_is_a_device_error(make_machine: Callable[..., FakeMachine]) -> None:
    import attrs

    window = MemoryRange(0xC000_0000, 0x2000)
    tiny = make_machine(layout=attrs.evolve(LAYOUT, pci_mmio32=window, pci_mmio64=None))
    root = tiny.pci_segment()
    assert root is not None
    root.add_function(Recorder("a", PciBar(0, 0x2000, BarKind.MEM32)))
    with pytest.raises(DeviceError, match="no room"):
        root.add_function(Recorder("b", PciBar(0, 0x1000, BarKind.MEM32)))
    with pytest.raises(DeviceError):
        root.add_function(Recorder("c", PciBar(0, 0x20, BarKind.IO), PciBar(1, 0x1000, BarKind.MEM32)))
    # the I/O BAR that fitted before the failure was released again
    assert root.add_function(Recorder("d", PciBar(0, 0x20, BarKind.IO))) == 2


def test_sizing_does_not_move_anything(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x8_0000, BarKind.MEM64))
    root.add_function(fn)
    base = root.bar_base(fn, 0)
    fn.events.clear()
    machine.guest.function(1).read_bases()  # per BAR: decoding off, size, restore, decoding on
    assert root.bar_base(fn, 0) == base
    assert fn.events == [("unmapped", 0, base), ("mapped", 0, base)] * 5  # BAR0 (64-bit), BAR2-5


def test_relocation_moves_the_bus_range(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x8_0000, BarKind.MEM64), PciBar(2, 0x1000, BarKind.MEM32),
                  PciBar(3, 0x20, BarKind.IO))
    root.add_function(fn)
    guest = machine.guest.function(1)
    old64, old32, old_io = (root.bar_base(fn, i) for i in (0, 2, 3))
    assert old64 is not None and old32 is not None and old_io is not None
    new64, new32, new_io = 0x18_0000_0000, 0xCF00_0000, 0x8000
    # as pci_std_update_resource does it: decoding off while a 64-bit BAR is half-written
    cmd = guest.read16(c.COMMAND)
    guest.write16(c.COMMAND, cmd & ~(c.COMMAND_MEMORY | c.COMMAND_IO))
    assert region_at(machine, old64) is None and region_at(machine, old_io, io=True) is None
    guest.write32(0x10, new64 & 0xFFFF_FFFF | 0x4)
    guest.write32(0x14, new64 >> 32)
    guest.write32(0x18, new32)
    guest.write32(0x1C, new_io | 1)
    guest.write16(c.COMMAND, cmd)
    assert (root.bar_base(fn, 0), root.bar_base(fn, 2), root.bar_base(fn, 3)) == (new64, new32, new_io)
    assert region_at(machine, old64) is None and region_at(machine, old32) is None
    assert region_at(machine, old_io, io=True) is None
    assert isinstance(region_at(machine, new64 + 0x7FFFF), BarRegion)
    assert region_at(machine, new64 + 0x80000) is None
    assert machine.guest.read(new32, 1) == 2
    machine.guest.cpu.pio_write(new_io + 4, b"\x99")
    assert fn.writes[-1] == (3, 4, b"\x99")


def test_relocation_with_decoding_on_moves_at_each_write(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x1000, BarKind.MEM32))
    root.add_function(fn)
    machine.guest.function(1).write32(0x10, 0xC800_0000)
    assert root.bar_base(fn, 0) == 0xC800_0000
    machine.guest.function(1).write32(0x10, 0)  # address 0: not decoded
    assert root.bar_base(fn, 0) is None


def test_moving_onto_another_device_leaves_the_bar_unmapped(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    a, b = Recorder("a", PciBar(0, 0x1000, BarKind.MEM32)), Recorder("b", PciBar(0, 0x1000, BarKind.MEM32))
    root.add_function(a)
    root.add_function(b)
    a_base = root.bar_base(a, 0)
    b_base = root.bar_base(b, 0)
    machine.guest.function(2).write32(0x10, a_base)  # type: ignore[arg-type]
    assert root.bar_base(b, 0) is None
    assert machine.guest.read(a_base, 1) == 0  # type: ignore[arg-type]  # still a's
    machine.guest.function(2).write32(0x10, LAYOUT.pci_ecam.start)  # type: ignore[union-attr]
    assert root.bar_base(b, 0) is None
    machine.guest.function(2).write32(0x10, b_base)  # type: ignore[arg-type]
    assert root.bar_base(b, 0) == b_base


def test_reset_restores_power_on_placement(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x1000, BarKind.MEM32))
    root.add_function(fn)
    base = root.bar_base(fn, 0)
    machine.guest.function(1).write32(0x10, 0xCA00_0000)
    fn.reset()
    assert root.bar_base(fn, 0) == base
    root.config_address = 0x8000_1234
    root.reset()
    assert root.config_address == 0


def test_remove_function(machine: FakeMachine) -> None:
    root = machine.pci_segment()
    assert root is not None
    fn = Recorder("a", PciBar(0, 0x1000, BarKind.MEM32))
    slot = root.add_function(fn)
    base = root.bar_base(fn, 0)
    assert root.remove_function(slot) is fn
    assert region_at(machine, base) is None  # type: ignore[arg-type]
    assert machine.guest.function(slot).read16(0) == 0xFFFF
    fn2 = Recorder("b", PciBar(0, 0x1000, BarKind.MEM32))
    root.add_function(fn2)
    assert root.bar_base(fn2, 0) == base
    with pytest.raises(DeviceError):
        root.remove_function(0)


def test_intx_lines_are_shared_and_level(machine: FakeMachine, vm: FakeVm) -> None:
    root = machine.pci_segment()
    assert root is not None
    vm.supports_irqfd = False
    pins: list[IntxPin] = []
    for i in range(6):
        fn = Recorder(f"f{i}")
        root.add_function(fn)
        pin = root.connect_intx(fn, machine.allocate_irq)
        assert pin is not None
        pins.append(pin)
    gsis = [pin.gsi for pin in pins]
    assert len(set(gsis)) == 4  # four lines, shared by slot
    assert gsis[4] == gsis[0] and gsis[5] == gsis[1]
    assert root.intx_routes() == tuple((i + 1, 1, gsi) for i, gsi in enumerate(gsis))
    pins[0].set_level(True)
    pins[4].set_level(True)
    pins[0].set_level(False)
    assert vm.lines[gsis[0]] is True  # slot 5 still asserts it
    pins[4].set_level(False)
    assert vm.lines[gsis[0]] is False
    assert vm.line_history == [(gsis[0], True), (gsis[0], False)]


def test_intx_without_free_lines(make_machine: Callable[..., FakeMachine]) -> None:
    import attrs

    none_left = make_machine(layout=attrs.evolve(LAYOUT, device_irqs=(5, 4)))
    root = none_left.pci_segment()
    assert root is not None
    fn = Recorder("a")
    root.add_function(fn)
    assert root.connect_intx(fn, none_left.allocate_irq) is None


def test_shared_intx_counts_sources_not_calls() -> None:
    levels: list[bool] = []

    class Line:
        def trigger(self) -> None: ...

        def set_level(self, high: bool) -> None:
            levels.append(high)

    shared = SharedIntx(9, Line())
    shared.set_level(1, True)
    shared.set_level(1, True)
    shared.set_level(2, False)
    shared.set_level(1, False)
    assert levels == [True, False]


_accesses = st.lists(st.tuples(st.booleans(), st.integers(-4, 0x1000_0004),
                               st.sampled_from([0, 1, 2, 3, 4, 8, 16]), st.integers(0, (1 << 128) - 1)),
                     max_size=80)


@settings(max_examples=150, deadline=None)
@given(_accesses)
def test_hostile_config_accesses_never_raise(accesses: list[tuple[bool, int, int, int]]) -> None:
    from vmmkit.bus import Bus

    root = PciRoot(mmio_bus=Bus("mmio"), pio_bus=Bus("pio"), mmio32=LAYOUT.pci_mmio32,
                   mmio64=LAYOUT.pci_mmio64, io=LAYOUT.pio, ecam=LAYOUT.pci_ecam)
    root.add_function(Recorder("a", PciBar(0, 0x8_0000, BarKind.MEM64), PciBar(2, 0x20, BarKind.IO)))
    cf8, ecam = PciConfigIo(root), PciEcam(root)
    for use_ecam, offset, size, value in accesses:
        device = ecam if use_ecam else cf8
        if not use_ecam:
            offset &= 0xF
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        device.write(offset, data)
        assert len(device.read(offset, size)) == size
        if not use_ecam and offset == 0 and size == 4:
            device.write(0, (0x8000_0000 | (value & 0xFFFC)).to_bytes(4, "little"))
    assert cf8.read(4, 4) or True
    assert PciEcam(root).read(0, 4) == (0x0D57_8086).to_bytes(4, "little")
