"""The arm64 ``Image`` loader (Linux's Documentation/arch/arm64/booting.rst).

The 64-byte header::

    0x00  code0, code1       (u32 each: executable; a branch to the kernel's start)
    0x08  text_offset        (u64: where the image goes past a 2 MiB-aligned base)
    0x10  image_size         (u64: bytes from the load address the kernel uses, .bss included;
                              0 in kernels before 3.17: text_offset is then 0x80000)
    0x18  flags              (u64: bit 0 big-endian, bits 1-2 page size, bit 3 "may be placed
                              anywhere in RAM" else as low as possible)
    0x20  res2, res3, res4
    0x38  magic              "ARM\\x64"
    0x3c  res5               (offset of a PE header, for EFI stubs: ignored)

The image is loaded at ``RAM start + text_offset`` (RAM starts 2 MiB-aligned, so both placement
rules are met), entered at its first byte with x0 = the DTB. The initramfs and the DTB go at the
top of RAM (see :mod:`vmmkit_aarch64.layout`); every size is checked against the file and RAM.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vmmkit.arch import BootInfo, MemoryLayout
from vmmkit.errors import BootError
from vmmkit.memory import MemoryRange
from vmmkit_aarch64 import layout as L
from vmmkit_aarch64.arch import HEADER_SIZE, recognise
from vmmkit_aarch64.arch import MAGIC as MAGIC  # the header's facts live in arch (see there); re-exported
from vmmkit_aarch64.arch import MAGIC_OFFSET as MAGIC_OFFSET

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

DEFAULT_TEXT_OFFSET: Final = 0x80000
FLAG_BIG_ENDIAN: Final = 1 << 0
FLAG_PAGE_SIZE_SHIFT: Final = 1
FLAG_PLACEMENT_ANYWHERE: Final = 1 << 3
ALIGNMENT: Final = 2 * L.MIB
PAGE: Final = 4096
CHUNK: Final = 1 << 20
PAGE_SIZES: Final = {0: "unspecified", 1: "4K", 2: "16K", 3: "64K"}
#: The kernel's command line limit (COMMAND_LINE_SIZE on arm64).
CMDLINE_MAX: Final = 2048


def parse_header(path: Path, header: bytes, file_size: int) -> tuple[int, int, int]:
    """``(text_offset, image_size, flags)`` of a recognised header, checked."""
    if len(header) < HEADER_SIZE:
        raise BootError(path, f"truncated: an arm64 Image header is {HEADER_SIZE} bytes, the file has {file_size}")
    text_offset, image_size, flags = struct.unpack_from("<QQQ", header, 0x08)
    if flags & FLAG_BIG_ENDIAN:
        raise BootError(path, "a big-endian arm64 Image is not supported (flags bit 0 is set)")
    if image_size == 0:  # kernels before 3.17
        text_offset = DEFAULT_TEXT_OFFSET
        image_size = file_size
    if text_offset % PAGE or text_offset >= ALIGNMENT * 512:
        raise BootError(path, f"implausible text_offset {text_offset:#x} in the arm64 Image header")
    if image_size < file_size:
        raise BootError(path, f"image_size {image_size:#x} in the header is smaller than the file ({file_size:#x})")
    return text_offset, image_size, flags


def load(path: Path, memory: GuestMemory, config: VmConfig, layout: MemoryLayout) -> BootInfo:
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise BootError(path, exc.strerror or str(exc)) from None
    with stream:
        file_size = os.fstat(stream.fileno()).st_size
        header = stream.read(HEADER_SIZE)
        if not recognise(header):
            raise BootError(path, "not an arm64 Image (no \"ARM\\x64\" magic at offset 0x38)")
        text_offset, image_size, flags = parse_header(path, header, file_size)
        ram = layout.ram[0]
        base = _align_up(ram.start, ALIGNMENT)
        load_addr = base + text_offset
        kernel = MemoryRange(load_addr, _align_up(image_size, PAGE))
        top = _payload_top(ram)
        if kernel.end > top:
            raise BootError(path, f"the kernel needs {image_size:#x} bytes at {load_addr:#x}: more than the "
                                  f"guest's RAM ({ram.size // L.MIB} MiB, less 2 MiB for the device tree) holds")
        stream.seek(0)
        offset = 0
        while offset < file_size:
            chunk = stream.read(min(CHUNK, file_size - offset))
            if not chunk:
                raise BootError(path, "truncated: the image could not be read in full")
            memory.write(load_addr + offset, chunk)
            offset += len(chunk)
    memory.fill(load_addr + file_size, kernel.end - (load_addr + file_size))
    cmdline = (config.payload.cmdline or "").encode()
    if len(cmdline) >= CMDLINE_MAX:
        raise BootError(path, f"the command line is {len(cmdline)} bytes; arm64 kernels take at most {CMDLINE_MAX - 1}")
    initramfs = _load_initramfs(path, config, memory, kernel_end=kernel.end, top=top)
    return BootInfo(
        protocol="arm64-image",
        entry=load_addr,
        kernel=kernel,
        cmdline=cmdline,
        initramfs=initramfs,
        extra={
            "text_offset": text_offset,
            "image_size": image_size,
            "flags": flags,
            "page_size": PAGE_SIZES[(flags >> FLAG_PAGE_SIZE_SHIFT) & 3],
            "placement_anywhere": bool(flags & FLAG_PLACEMENT_ANYWHERE),
        },
    )


def _payload_top(ram: MemoryRange) -> int:
    """Where the kernel and initramfs must end: below the device tree's 2 MiB."""
    return fdt_address(ram)


def fdt_address(ram: MemoryRange) -> int:
    """The DTB's address: the last 2 MiB-aligned 2 MiB of the first RAM range."""
    return (ram.end - L.FDT_MAX_SIZE) & ~(ALIGNMENT - 1)


def _load_initramfs(path: Path, config: VmConfig, memory: GuestMemory, *, kernel_end: int,
                    top: int) -> MemoryRange | None:
    if config.payload.initramfs is None:
        return None
    initramfs = Path(config.payload.initramfs)
    try:
        stream = initramfs.open("rb")
    except OSError as exc:
        raise BootError(initramfs, exc.strerror or str(exc)) from None
    with stream:
        size = os.fstat(stream.fileno()).st_size
        start = (top - size) & ~(PAGE - 1)
        if size == 0 or start < kernel_end:
            raise BootError(initramfs, f"the initramfs ({size} bytes) does not fit in RAM between the "
                                       f"kernel (ends {kernel_end:#x}) and the device tree ({top:#x})")
        offset = 0
        while offset < size:
            chunk = stream.read(min(CHUNK, size - offset))
            if not chunk:
                raise BootError(initramfs, "truncated: could not be read in full")
            memory.write(start + offset, chunk)
            offset += len(chunk)
    return MemoryRange(start, size)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
