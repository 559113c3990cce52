"""The arm64 Image loader: header checks, placement, initramfs, command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from aarch64_helpers import image_header, make_config, write_image
from vmmkit_aarch64 import image
from vmmkit_aarch64 import layout as L

from vmmkit.errors import BootError


def test_the_magic_at_0x38_is_what_is_recognised() -> None:
    assert image.recognise(image_header())
    assert not image.recognise(image_header(magic=b"ARM\x65"))
    assert not image.recognise(image_header()[:0x38])


def test_the_image_goes_to_ram_start_plus_text_offset(tmp_path: Path, guest) -> None:
    layout, memory = guest()
    body = bytes(range(256)) * 16
    kernel = write_image(tmp_path / "Image", body, text_offset=0x80000, image_size=0x100000)
    boot = image.load(kernel, memory, make_config(kernel, cmdline="hello"), layout)
    assert boot.protocol == "arm64-image"
    assert boot.entry == L.RAM_START + 0x80000
    assert memory.read(boot.entry + 64, len(body)) == body
    assert boot.kernel.start == boot.entry and boot.kernel.size == 0x100000
    assert boot.cmdline == b"hello"
    assert boot.extra["page_size"] == "4K"
    assert not boot.extra["placement_anywhere"]


def test_bss_beyond_the_file_is_zeroed(tmp_path: Path, guest) -> None:
    layout, memory = guest()
    memory.fill(L.RAM_START + 0x80000, 0x10000, 0xAA)
    kernel = write_image(tmp_path / "Image", b"\1" * 64, image_size=0x10000)
    image.load(kernel, memory, make_config(kernel), layout)
    assert memory.read(L.RAM_START + 0x80000 + 128, 0x10000 - 128) == bytes(0x10000 - 128)


def test_an_old_kernel_without_image_size_is_loaded_at_0x80000(tmp_path: Path, guest) -> None:
    layout, memory = guest()
    kernel = write_image(tmp_path / "Image", text_offset=0x1234000, image_size=0)
    boot = image.load(kernel, memory, make_config(kernel), layout)
    assert boot.entry == L.RAM_START + 0x80000


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"flags": 0x3}, "big-endian"),
        ({"text_offset": 0x80001}, "text_offset"),
        ({"image_size": 16}, "smaller than the file"),
        ({"image_size": 1 << 30}, "more than the guest's RAM"),
    ],
)
def test_bad_headers_are_refused_naming_the_file(tmp_path: Path, guest, header: dict, reason: str) -> None:
    layout, memory = guest()
    kernel = write_image(tmp_path / "Image", **header)
    with pytest.raises(BootError, match=reason) as info:
        image.load(kernel, memory, make_config(kernel), layout)
    assert str(kernel) in str(info.value)


def test_the_initramfs_sits_below_the_device_tree(tmp_path: Path, guest) -> None:
    layout, memory = guest()
    kernel = write_image(tmp_path / "Image")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * 10000)
    boot = image.load(kernel, memory, make_config(kernel, initramfs=initrd), layout)
    assert boot.initramfs is not None
    fdt = image.fdt_address(layout.ram[0])
    assert boot.initramfs.end <= fdt and boot.initramfs.start % 4096 == 0
    assert boot.initramfs.start >= boot.kernel.end
    assert memory.read(boot.initramfs.start, 10000) == b"\x07" * 10000


def test_an_initramfs_that_does_not_fit_is_refused(tmp_path: Path, guest) -> None:
    layout, memory = guest(16 << 20)
    kernel = write_image(tmp_path / "Image")
    initrd = tmp_path / "initrd"
    with initrd.open("wb") as stream:
        stream.truncate(15 << 20)
    with pytest.raises(BootError, match="does not fit"):
        image.load(kernel, memory, make_config(kernel, initramfs=initrd, memory="16M"), layout)


def test_a_command_line_longer_than_the_kernel_takes_is_refused(tmp_path: Path, guest) -> None:
    layout, memory = guest()
    kernel = write_image(tmp_path / "Image")
    with pytest.raises(BootError, match="command line"):
        image.load(kernel, memory, make_config(kernel, cmdline="x" * 2048), layout)


def test_the_dtb_is_2mib_aligned_in_the_last_2mib_of_ram(guest) -> None:
    layout, _ = guest(64 << 20)
    address = image.fdt_address(layout.ram[0])
    assert address % (2 << 20) == 0
    assert address + L.FDT_MAX_SIZE <= layout.ram[0].end
