"""Boot preparation: zero page, PVH start info, e820, GDT, page tables, MP table, command line."""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
import pytest
from vmmkit_x86_64 import e820, gdt, mptable
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64.arch import X86_64
from vmmkit_x86_64.loaders import load_kernel
from x86_helpers import build_bzimage, build_elf, make_config, pc_devices

from vmmkit.arch import BootInfo
from vmmkit.errors import BootError
from vmmkit.memory import MemoryRange

MiB = 1 << 20
GiB = 1 << 30


def boot_info(protocol: str, **extra) -> BootInfo:
    return BootInfo(
        protocol=protocol,
        entry=0x1000200,
        kernel=MemoryRange(0x1000000, 0x100000),
        cmdline=b"console=ttyS0",
        initramfs=MemoryRange(0x3000000, 0x12345),
        extra=extra,
    )


def e820_from_zero_page(page: bytes) -> list[tuple[int, int, int]]:
    count = page[0x1E8]
    return [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(count)]


# -- e820 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64 * MiB, 3 * GiB, 3 * GiB + 4096, 8 * GiB])
def test_e820_map(size: int) -> None:
    entries = e820.e820_map(L.memory_layout(size))
    ram = sum(e.size for e in entries if e.type == e820.E820_RAM)
    assert ram == size - (L.HIGH_RAM_START - L.EBDA_START)
    assert entries[0] == e820.E820Entry(0, 0x9FC00, e820.E820_RAM)
    assert entries[1] == e820.E820Entry(0x9FC00, 0x100000 - 0x9FC00, e820.E820_RESERVED)
    assert e820.E820Entry(L.PCI_ECAM.start, L.PCI_ECAM.size, e820.E820_RESERVED) in entries
    assert entries == sorted(entries, key=lambda e: e.addr)
    for before, after in zip(entries, entries[1:], strict=False):
        assert before.end <= after.addr
    if size > 3 * GiB:
        assert e820.E820Entry(4 * GiB, size - 3 * GiB, e820.E820_RAM) in entries


# -- linux64 ------------------------------------------------------------------------------------


def test_linux64_zero_page_for_a_bzimage(tmp_path: Path, guest) -> None:
    layout, memory = guest(64 * MiB)
    kernel = tmp_path / "bz"
    kernel.write_bytes(build_bzimage(b"\x90" * 0x1000))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initramfs" * 100)
    config = make_config(kernel, initramfs=initrd, cmdline="console=ttyS0 quiet")
    arch = X86_64()
    boot = load_kernel(kernel, memory, config, layout)
    final = arch.prepare_boot(memory, config, layout, boot, [])
    page = memory.read(L.ZERO_PAGE_START, 4096)
    header = boot.extra["setup_header"]
    # The setup header is copied, then the loader's fields are set.
    assert page[0x1F1] == header[0]
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, 0x206)[0] == 0x020F
    assert page[0x210] == 0xFF  # type_of_loader
    assert struct.unpack_from("<I", page, 0x228)[0] == L.CMDLINE_START
    assert struct.unpack_from("<I", page, 0x214)[0] == boot.extra["load_address"]  # code32_start
    assert struct.unpack_from("<II", page, 0x218) == (boot.initramfs.start, 900)
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0xE0000  # acpi_rsdp_addr
    assert page[0x1EF] == 0  # sentinel
    assert e820_from_zero_page(page) == [(e.addr, e.size, e.type) for e in e820.e820_map(layout)]
    assert memory.read_cstring(L.CMDLINE_START) == b"console=ttyS0 quiet"
    assert final.cmdline == b"console=ttyS0 quiet"
    assert final.extra["zero_page"] == L.ZERO_PAGE_START
    assert final.extra["rsdp"] == 0xE0000


def test_linux64_zero_page_for_a_vmlinux(tmp_path: Path, guest) -> None:
    layout, memory = guest(64 * MiB)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(build_elf([(0x1000000, b"\x90" * 64, 0x2000)], entry=0x1000000))
    config = make_config(kernel)
    boot = load_kernel(kernel, memory, config, layout)
    assert boot.protocol == "linux64"
    X86_64().prepare_boot(memory, config, layout, boot, [])
    page = memory.read(L.ZERO_PAGE_START, 4096)
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x210] == 0xFF
    assert struct.unpack_from("<I", page, 0x228)[0] == L.CMDLINE_START
    assert struct.unpack_from("<I", page, 0x238)[0] == len(b"console=ttyS0")
    assert struct.unpack_from("<I", page, 0x218)[0] == 0  # no initramfs


def test_linux64_page_tables_identity_map_4gib(guest) -> None:
    layout, memory = guest()
    X86_64().prepare_boot(memory, make_config(), layout, boot_info("linux64"), [])
    pml4 = memory.read_u64(L.PML4_START)
    assert pml4 == L.PDPT_START | 3
    for gib in range(4):
        pd = memory.read_u64(L.PDPT_START + 8 * gib)
        assert pd == (L.PD_START + 4096 * gib) | 3
        for j in (0, 1, 511):
            assert memory.read_u64(L.PD_START + 4096 * gib + 8 * j) == (gib << 30 | j << 21) | 0x83
    assert memory.read_u64(L.PDPT_START + 32) == 0
    # The LAPIC page is mapped by the last directory.
    lapic_pde = memory.read_u64(L.PD_START + 3 * 4096 + 8 * ((0xFEE00000 >> 21) & 511))
    assert lapic_pde & ~0xFFF == 0xFEE00000


def test_linux64_gdt(guest) -> None:
    layout, memory = guest()
    X86_64().prepare_boot(memory, make_config(), layout, boot_info("linux64"), [])
    entries = struct.unpack_from("<5Q", memory.read(L.BOOT_GDT_START, 40))
    assert entries == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
    code, data, tss = gdt.boot_segments(long_mode=True)
    assert (code.selector, code.l, code.db, code.type, code.limit, code.g) == (0x10, 1, 0, 0xB, 0xFFFFFFFF, 1)
    assert (data.selector, data.db, data.type) == (0x18, 1, 3)
    assert (tss.selector, tss.s, tss.type) == (0x20, 0, 0xB)


# -- pvh ----------------------------------------------------------------------------------------


def test_pvh_start_info(guest) -> None:
    layout, memory = guest(64 * MiB)
    final = X86_64().prepare_boot(memory, make_config(), layout, boot_info("pvh"), [])
    info = memory.read(L.PVH_INFO_START, 56)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", info
    )
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (cmdline, rsdp, memmap) == (L.CMDLINE_START, 0xE0000, L.PVH_MEMMAP_START)
    assert struct.unpack_from("<QQQQ", memory.read(modlist, 32)) == (0x3000000, 0x12345, 0, 0)
    expected = e820.e820_map(layout)
    assert entries == len(expected)
    table = [struct.unpack_from("<QQII", memory.read(memmap + 24 * i, 24)) for i in range(entries)]
    assert table == [(e.addr, e.size, e.type, 0) for e in expected]
    assert final.extra["start_info"] == L.PVH_INFO_START
    code, _, _ = gdt.boot_segments(long_mode=False)
    assert (code.selector, code.l, code.db) == (0x10, 0, 1)
    assert memory.read_u64(L.BOOT_GDT_START + 0x10) == 0x00CF9B000000FFFF


def test_pvh_without_initramfs_has_no_modules(guest) -> None:
    layout, memory = guest()
    boot = attrs.evolve(boot_info("pvh"), initramfs=None)
    X86_64().prepare_boot(memory, make_config(), layout, boot, [])
    nr_modules, modlist = struct.unpack_from("<IQ", memory.read(L.PVH_INFO_START + 12, 12))
    assert (nr_modules, modlist) == (0, 0)


# -- common ---------------------------------------------------------------------------------------


def test_command_line_gains_virtio_mmio_devices(guest) -> None:
    layout, memory = guest()
    final = X86_64().prepare_boot(memory, make_config(), layout, boot_info("linux64"), pc_devices())
    expected = b"console=ttyS0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6"
    assert final.cmdline == expected
    assert memory.read_cstring(L.CMDLINE_START, 1 << 16) == expected


@pytest.mark.parametrize(
    "cmdline,expected",
    [
        (b"console=ttyS0", b"console=ttyS0"),
        (b"console=ttyS0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6 -- x",
         b"console=ttyS0 -- x"),
        (b"console=ttyS0 acpi=off",
         b"console=ttyS0 acpi=off virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6"),
    ],
)
def test_linux_finds_virtio_mmio_devices_in_the_dsdt_only(guest, cmdline: bytes, expected: bytes) -> None:
    """A Linux kernel would register each device from the DSDT and again from the command line
    (the second probe fails: "can't request region"), so it gets no virtio_mmio.device= words,
    unless it is told acpi=off."""
    layout, memory = guest()
    boot = attrs.evolve(boot_info("linux64", linux=True), cmdline=cmdline)
    final = X86_64().prepare_boot(memory, make_config(), layout, boot, pc_devices())
    assert final.cmdline == expected


def test_command_line_over_the_kernel_limit(guest) -> None:
    layout, memory = guest()
    boot = boot_info("linux64", cmdline_max=20)
    with pytest.raises(BootError, match="at most 20"):
        X86_64().prepare_boot(memory, make_config(), layout, boot, pc_devices())


def test_unknown_protocol(guest) -> None:
    layout, memory = guest()
    with pytest.raises(BootError, match="'arm64-image' protocol"):
        X86_64().prepare_boot(memory, make_config(), layout, boot_info("arm64-image"), [])


def test_acpi_and_mp_tables_are_written(guest) -> None:
    layout, memory = guest()
    config = make_config(boot_vcpus=2, max_vcpus=4)
    X86_64().prepare_boot(memory, config, layout, boot_info("linux64"), pc_devices())
    assert memory.read(0xE0000, 8) == b"RSD PTR "
    assert memory.read(L.MPTABLE_START, 4) == b"_MP_"


def parse_mptable(data: bytes) -> tuple[bytes, list[tuple[int, tuple[int, ...]]]]:
    assert data[:4] == b"_MP_" and sum(data[:16]) & 0xFF == 0
    pointer = struct.unpack_from("<I", data, 4)[0]
    table = data[pointer - L.MPTABLE_START :]
    length, _rev, _sum = struct.unpack_from("<HBB", table, 4)
    table = table[:length]
    assert table[:4] == b"PCMP" and sum(table) & 0xFF == 0
    count = struct.unpack_from("<H", table, 34)[0]
    entries = []
    pos = 44
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(count):
        kind = table[pos]
        entries.append((kind, tuple(table[pos : pos + sizes[kind]])))
        pos += sizes[kind]
    assert pos == length
    return table, entries


def test_mp_table(guest) -> None:
    data = mptable.mptable(
        L.MPTABLE_START,
        apic_ids=[0, 1, 2, 4],
        enabled=2,
        ioapic_id=5,
        ioapic_address=0xFEC00000,
        lapic_address=0xFEE00000,
    )
    assert L.MPTABLE_START + len(data) <= L.BIOS_START
    table, entries = parse_mptable(data)
    assert struct.unpack_from("<I", table, 36)[0] == 0xFEE00000
    cpus = [(e[1], e[3]) for k, e in entries if k == 0]
    assert cpus == [(0, 3), (1, 1), (2, 0), (4, 0)]  # id, flags (enabled | BSP)
    assert [e[2:8] for k, e in entries if k == 1] == [tuple(b"ISA   ")]
    assert [(e[1], e[3], struct.unpack("<I", bytes(e[4:8]))[0]) for k, e in entries if k == 2] == [
        (5, 1, 0xFEC00000)
    ]
    ioints = {e[5]: (e[7], e[2] | e[3] << 8) for k, e in entries if k == 3}  # src irq -> (pin, flags)
    assert ioints[0] == (2, 0)
    assert 2 not in ioints
    assert ioints[9] == (9, 0x0D)
    assert ioints[4] == (4, 0) and ioints[23] == (23, 0)
    assert all(e[6] == 5 for k, e in entries if k == 3)
    lints = [(e[1], e[6], e[7]) for k, e in entries if k == 4]
    assert lints == [(3, 0xFF, 0), (1, 0xFF, 1)]  # ExtINT -> LINT0, NMI -> LINT1


def test_mp_table_fits_for_the_largest_vm() -> None:
    data = mptable.mptable(
        L.MPTABLE_START,
        apic_ids=list(range(254)),
        enabled=254,
        ioapic_id=0,
        ioapic_address=0xFEC00000,
        lapic_address=0xFEE00000,
    )
    assert L.MPTABLE_START + len(data) <= L.BIOS_START
    parse_mptable(data)
