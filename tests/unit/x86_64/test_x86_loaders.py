"""Kernel loaders: real kernels, synthetic images and hostile ones."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from vmmkit_x86_64 import bzimage, elf
from vmmkit_x86_64.loaders import load_kernel
from x86_helpers import build_bzimage, build_elf, make_config

from vmmkit.errors import BootError
from vmmkit.memory import MemoryRange

MiB = 1 << 20


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def load(path: Path, guest, *, size: int = 64 * MiB, **config):
    layout, memory = guest(size)
    cfg = make_config(path, **config)
    return load_kernel(path, memory, cfg, layout), memory


def assert_boot_error(excinfo: pytest.ExceptionInfo[BootError], path: Path, *fragments: str) -> None:
    message = str(excinfo.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


# -- real kernels -------------------------------------------------------------------------------


def test_linux_vmlinux_is_entered_through_pvh(linux_dir: Path, guest) -> None:
    vmlinux = linux_dir / "vmlinux"
    boot, memory = load(vmlinux, guest)
    assert boot.protocol == "pvh"
    assert boot.extra["format"] == "elf"
    assert boot.extra["elf_entry"] == 0x1000000  # phys_startup_64
    assert boot.kernel.start == 0x1000000
    assert boot.kernel.contains(boot.entry)
    assert boot.extra["cmdline_max"] == 2047  # a Linux kernel: COMMAND_LINE_SIZE
    # The first loaded segment is .text at 16 MiB: the bytes match the file.
    with vmlinux.open("rb") as f:
        f.seek(0x200000)
        assert memory.read(0x1000000, 4096) == f.read(4096)


def test_linux_bzimage_is_entered_at_load_address_plus_0x200(linux_dir: Path, guest) -> None:
    image = linux_dir / "bzImage"
    boot, memory = load(image, guest)
    header = image.read_bytes()[:0x290]
    setup_sects = header[0x1F1] or 4
    assert boot.protocol == "linux64"
    assert boot.extra["format"] == "bzimage"
    load_address = boot.extra["load_address"]
    assert load_address == struct.unpack_from("<Q", header, 0x258)[0]  # pref_address (not relocatable)
    assert boot.entry == load_address + 0x200
    init_size = struct.unpack_from("<I", header, 0x260)[0]
    assert boot.kernel == MemoryRange(load_address, init_size)
    assert boot.extra["setup_header"] == header[0x1F1 : 0x202 + header[0x201]]
    assert boot.extra["cmdline_max"] == struct.unpack_from("<I", header, 0x238)[0]
    payload = image.read_bytes()[(setup_sects + 1) * 512 :]
    assert memory.read(load_address, 4096) == payload[:4096]


def test_linux_bzimage_needs_init_size_of_ram(linux_dir: Path, guest) -> None:
    image = linux_dir / "bzImage"
    with pytest.raises(BootError) as excinfo:
        load(image, guest, size=24 * MiB)
    assert_boot_error(excinfo, image, "outside guest RAM")


def test_linux_bzimage_with_initramfs_places_it_high(linux_dir: Path, guest, tmp_path: Path) -> None:
    initramfs = write(tmp_path, "initrd.cpio", b"070701" + bytes(10_000))
    boot, memory = load(linux_dir / "bzImage", guest, initramfs=initramfs)
    assert boot.initramfs is not None
    assert boot.initramfs.size == 10_006
    assert boot.initramfs.start % 4096 == 0
    assert boot.initramfs.end <= 64 * MiB
    assert boot.initramfs.start >= boot.kernel.end
    assert 64 * MiB - boot.initramfs.end < 4096
    assert memory.read(boot.initramfs.start, 6) == b"070701"


def test_selftest_elf_and_bzimage(selftest_dir: Path, guest) -> None:
    boot, _ = load(selftest_dir / "selftest.elf", guest)
    assert boot.protocol == "pvh"
    assert boot.extra["elf_entry"] != boot.entry or boot.extra["pvh_entry"] is not None
    bz = selftest_dir / "selftest.bzImage"
    if not bz.is_file():
        pytest.skip("selftest.bzImage is not built")
    boot, _ = load(bz, guest)
    assert boot.protocol == "linux64"
    assert boot.entry == boot.extra["load_address"] + 0x200


def test_loaders_tell_linux_from_other_kernels(linux_dir: Path, selftest_dir: Path, guest) -> None:
    """``extra["linux"]``: Linux finds virtio-mmio devices in the DSDT, other guests on the
    command line (see boot._final_cmdline)."""
    assert load(linux_dir / "vmlinux", guest)[0].extra["linux"] is True
    assert load(linux_dir / "bzImage", guest)[0].extra["linux"] is True
    assert load(selftest_dir / "selftest.elf", guest)[0].extra["linux"] is False
    if (selftest_dir / "selftest.bzImage").is_file():
        assert load(selftest_dir / "selftest.bzImage", guest)[0].extra["linux"] is False


# -- synthetic ELF ----------------------------------------------------------------------------


def test_elf_without_pvh_note_uses_e_entry(tmp_path: Path, guest) -> None:
    code = b"\xf4" * 64
    path = write(tmp_path, "k.elf", build_elf([(0x200000, code, 0x3000)], entry=0x200010))
    boot, memory = load(path, guest)
    assert (boot.protocol, boot.entry) == ("linux64", 0x200010)
    assert boot.kernel == MemoryRange(0x200000, 0x3000)
    assert memory.read(0x200000, 64) == code
    assert memory.read(0x200040, 0x3000 - 64) == bytes(0x3000 - 64)  # bss zeroed
    assert boot.extra["cmdline_max"] == 0xFFFF  # not Linux: the whole command-line area


def test_elf_virtual_entry_is_translated(tmp_path: Path, guest) -> None:
    path = write(
        tmp_path,
        "k.elf",
        build_elf(
            [(0x200000, b"\x90" * 16, 0x1000)], entry=0xFFFFFFFF80200004, vaddr_offset=0xFFFFFFFF80000000
        ),
    )
    boot, _ = load(path, guest)
    assert boot.entry == 0x200004


def test_elf_with_pvh_note_uses_pvh(tmp_path: Path, guest) -> None:
    path = write(
        tmp_path,
        "k.elf",
        build_elf([(0x100000, b"\x90" * 32, 0x1000)], entry=0x100000, pvh_entry=0x100010, linux=True),
    )
    boot, _ = load(path, guest)
    assert (boot.protocol, boot.entry) == ("pvh", 0x100010)
    assert boot.extra["cmdline_max"] == 2047


def test_elf32_pvh_kernel_loads(tmp_path: Path, guest) -> None:
    path = write(
        tmp_path,
        "k32.elf",
        build_elf([(0x100000, b"\x90" * 32, 0x1000)], entry=0x100000, pvh_entry=0x100000, elf_class=32),
    )
    boot, _ = load(path, guest)
    assert (boot.protocol, boot.entry) == ("pvh", 0x100000)


def test_elf32_without_pvh_note_is_refused(tmp_path: Path, guest) -> None:
    path = write(tmp_path, "k32.elf", build_elf([(0x100000, b"\x90", 0x1000)], entry=0x100000, elf_class=32))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "32-bit ELF without a PVH note")


def test_elf_initramfs_goes_above_the_kernel(tmp_path: Path, guest) -> None:
    kernel = write(tmp_path, "k.elf", build_elf([(0x100000, b"\x90", 0x1000)], entry=0x100000))
    initramfs = write(tmp_path, "initrd", bytes(range(256)) * 40)
    boot, memory = load(kernel, guest, initramfs=initramfs)
    assert boot.initramfs is not None and boot.initramfs.start > 0x101000
    assert memory.read(boot.initramfs.start, 256) == bytes(range(256))


@pytest.mark.parametrize(
    ("segments", "entry", "fragment"),
    [
        ([(0x200000, b"\x90", 0x1000)], 0x900000, "entry point 0x900000 is not inside a loaded segment"),
        (
            [(63 * MiB, b"\x90", 2 * MiB)],
            63 * MiB,
            "segment 0 (0x3f00000-0x4100000) lies outside guest RAM",
        ),  # past the end of RAM
        ([(0xF000_0000, b"\x90", 0x1000)], 0xF000_0000, "outside guest RAM"),  # in the 32-bit hole
        ([(0x80000, b"\x90", 0x1000)], 0x80000, "overlaps the boot area below 1 MiB"),
        ([(0x200000, b"\x90", 1 << 62)], 0x200000, "outside guest RAM"),  # absurd memsz
    ],
)
def test_elf_segments_must_fit_in_ram(tmp_path: Path, guest, segments, entry, fragment) -> None:
    path = write(tmp_path, "bad.elf", build_elf(segments, entry=entry))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, fragment)


def test_elf_pvh_entry_outside_the_kernel(tmp_path: Path, guest) -> None:
    path = write(
        tmp_path, "bad.elf", build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000, pvh_entry=0x300000)
    )
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "PVH entry point 0x300000")


def test_truncated_elf_segment(tmp_path: Path, guest) -> None:
    data = build_elf(
        [(0x200000, b"\x90" * 0x800, 0x1000), (0x300000, b"\xcc" * 0x2000, 0x2000)], entry=0x200000
    )
    path = write(tmp_path, "cut.elf", data[:-0x100])
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "truncated: segment 1 extends past the end of the file")


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d[:40], "truncated: the ELF header"),
        (lambda d: d[:4] + b"\x07" + d[5:], "unknown class 7"),
        (lambda d: d[:5] + b"\x02" + d[6:], "big-endian"),
        (lambda d: d[:18] + struct.pack("<H", 183) + d[20:], "machine 183"),
        (lambda d: d[:54] + struct.pack("<H", 40) + d[56:], "program header size 40"),
        (lambda d: d[:56] + struct.pack("<H", 0) + d[58:], "0 program headers"),
        (lambda d: d[:56] + struct.pack("<H", 0xFFFF) + d[58:], "65535 program headers"),
        (lambda d: d[:32] + struct.pack("<Q", 1 << 40) + d[40:], "truncated: the program header table"),
    ],
)
def test_malformed_elf_headers(tmp_path: Path, guest, mutate, fragment) -> None:
    data = build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000)
    path = write(tmp_path, "bad.elf", mutate(data))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, fragment)


def test_elf_filesz_larger_than_memsz(tmp_path: Path, guest) -> None:
    path = write(tmp_path, "bad.elf", build_elf([(0x200000, b"\x90" * 0x2000, 0x1000)], entry=0x200000))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "more file bytes")


def test_elf_malformed_pvh_note(tmp_path: Path, guest) -> None:
    data = bytearray(build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000, pvh_entry=0x200000))
    # The note's descsz (second word of the note, at the PT_NOTE segment's offset + 4): 8 -> 2.
    note_offset = data.index(b"Xen\0") - 12
    struct.pack_into("<I", data, note_offset + 4, 2)
    path = write(tmp_path, "bad.elf", bytes(data))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "malformed PVH note")


def test_booting_an_elf_imports_no_pyelftools_and_no_other_loader(tmp_path: Path) -> None:
    """Importing pyelftools costs 25-45 ms of a cold start: the loader reads ELF with struct, and
    the plugin imports only the loaders it tries."""
    kernel = write(tmp_path, "k.elf", build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000, pvh_entry=0x200000))
    script = f"""
import sys
from pathlib import Path
from vmmkit.memory import GuestMemory
from vmmkit_x86_64 import plugin
from vmmkit_x86_64.layout import memory_layout
from x86_helpers import make_config
kernel = Path({str(kernel)!r})
layout = memory_layout(64 << 20)
with GuestMemory.allocate(layout.ram) as memory:
    boot = plugin.load_elf("x86_64", kernel, kernel.read_bytes(), memory, make_config(kernel), layout)
assert boot.protocol == "pvh", boot
print(sorted(m for m in sys.modules if m.startswith(("elftools", "vmmkit_x86_64.bzimage", "vmmkit_x86_64.loaders"))))
"""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"  # (structlog, unconfigured, logs to stdout)


def test_parse_notes_stops_at_garbage() -> None:
    good = struct.pack("<III", 4, 4, 18) + b"Xen\0" + b"\x10\0\0\0"
    bad = struct.pack("<III", 0xFFFFFFF0, 4, 1) + b"junk"
    assert elf.parse_notes(good + bad) == [(b"Xen", 18, b"\x10\0\0\0")]


# -- synthetic bzImage ------------------------------------------------------------------------


def test_bzimage_relocatable_loads_at_pref_address(tmp_path: Path, guest) -> None:
    payload = bytes(range(256)) * 64
    path = write(tmp_path, "bz", build_bzimage(payload))
    boot, memory = load(path, guest)
    assert boot.extra["load_address"] == 0x1000000
    assert boot.entry == 0x1000200
    assert memory.read(0x1000000, len(payload)) == payload


def test_bzimage_relocatable_falls_back_to_low_aligned_address(tmp_path: Path, guest) -> None:
    path = write(tmp_path, "bz", build_bzimage(init_size=8 * MiB, pref_address=0x1000000))
    boot, _ = load(path, guest, size=16 * MiB)
    assert boot.extra["load_address"] == 0x200000  # 2 MiB aligned, from 1 MiB


def test_bzimage_setup_sects_zero_means_four(tmp_path: Path, guest) -> None:
    data = bytearray(build_bzimage(b"\xab" * 0x1000, setup_sects=4))
    data[0x1F1] = 0
    path = write(tmp_path, "bz", bytes(data))
    boot, memory = load(path, guest)
    assert memory.read(boot.extra["load_address"], 16) == b"\xab" * 16


def test_bzimage_initramfs_respects_initrd_addr_max(tmp_path: Path, guest) -> None:
    kernel = write(tmp_path, "bz", build_bzimage(initrd_addr_max=0x2FFFFFF))
    initramfs = write(tmp_path, "initrd", b"x" * 5000)
    boot, _ = load(kernel, guest, initramfs=initramfs)
    assert boot.initramfs is not None
    assert boot.initramfs.end - 1 <= 0x2FFFFFF
    assert boot.initramfs.start == (0x3000000 - 5000) & ~0xFFF


def test_bzimage_initramfs_too_big(tmp_path: Path, guest) -> None:
    kernel = write(tmp_path, "bz", build_bzimage(init_size=32 * MiB))
    initramfs = tmp_path / "initrd"
    with initramfs.open("wb") as f:
        f.truncate(40 * MiB)
    with pytest.raises(BootError) as excinfo:
        load(kernel, guest, initramfs=initramfs)
    assert_boot_error(excinfo, initramfs, "does not fit in guest RAM")


def test_missing_initramfs(tmp_path: Path, guest) -> None:
    kernel = write(tmp_path, "bz", build_bzimage())
    with pytest.raises(BootError) as excinfo:
        load(kernel, guest, initramfs=tmp_path / "nope")
    assert_boot_error(excinfo, tmp_path / "nope", "cannot open the initramfs")


def test_cmdline_too_long_for_the_kernel(tmp_path: Path, guest) -> None:
    kernel = write(tmp_path, "bz", build_bzimage(cmdline_size=16))
    with pytest.raises(BootError) as excinfo:
        load(kernel, guest, cmdline="console=ttyS0 quiet loglevel=8")
    assert_boot_error(excinfo, kernel, "30 bytes", "at most 16")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"version": 0x020B}, "boot protocol 2.11 is too old"),
        ({"xloadflags": 0}, "no 64-bit entry point"),
        ({"loadflags": 0}, "zImage"),
        ({"kernel_alignment": 0x3000}, "kernel_alignment 0x3000"),
        ({"kernel_alignment": 0}, "kernel_alignment 0x0"),
        ({"kernel_alignment": 1 << 31}, "kernel_alignment 0x80000000"),
        ({"init_size": 0xFFFFFFFF}, "guest RAM below 0x4000000 is too small"),
        ({"relocatable": 0, "pref_address": 0x80000}, "overlaps the boot area below 1 MiB"),
        ({"relocatable": 0, "pref_address": 1 << 63}, "outside guest RAM"),
        ({"relocatable": 0, "pref_address": 0x1000000, "init_size": 60 * MiB}, "outside guest RAM"),
        ({"syssize": 0x10000000}, "truncated: the header promises"),
        ({"header_jump": 0xF0}, "setup header would end at 0x2f2"),
    ],
)
def test_hostile_bzimage_headers(tmp_path: Path, guest, fields, fragment) -> None:
    path = write(tmp_path, "bad-bz", build_bzimage(**fields))
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, fragment)


def test_bzimage_truncated_inside_setup(tmp_path: Path, guest) -> None:
    path = write(tmp_path, "cut-bz", build_bzimage(setup_sects=30)[:0x1000])
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "truncated")


def test_bzimage_truncated_header(tmp_path: Path, guest) -> None:
    path = write(tmp_path, "cut-bz", build_bzimage()[:0x220])
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "truncated: the setup header")


# -- recognition --------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"hello world", b"MZ" + bytes(4096), bytes(70000)])
def test_unknown_images_are_rejected_by_name(tmp_path: Path, guest, data: bytes) -> None:
    path = write(tmp_path, "mystery.bin", data)
    with pytest.raises(BootError) as excinfo:
        load(path, guest)
    assert_boot_error(excinfo, path, "not an ELF, bzImage or PVH kernel")
    assert excinfo.value.path == path


def test_missing_kernel(tmp_path: Path, guest) -> None:
    with pytest.raises(BootError) as excinfo:
        load(tmp_path / "absent", guest)
    assert_boot_error(excinfo, tmp_path / "absent")


def test_recognisers() -> None:
    assert elf.recognise(b"\x7fELF\x02")
    assert not elf.recognise(b"\x7fEL")
    assert bzimage.recognise(build_bzimage()[:0x300])
    assert not bzimage.recognise(bytes(0x300))


def test_garbage_section_headers_are_ignored(tmp_path: Path, guest) -> None:
    """Only program headers matter; a hostile section header table is never read."""
    data = bytearray(build_elf([(0x200000, b"\x90", 0x1000)], entry=0x200000))
    struct.pack_into("<Q", data, 40, 1 << 50)  # e_shoff
    struct.pack_into("<HHH", data, 58, 64, 0xFFFF, 0xFFFE)  # e_shentsize, e_shnum, e_shstrndx
    boot, _ = load(write(tmp_path, "odd.elf", bytes(data)), guest)
    assert boot.protocol == "linux64"
