"""The bzImage loader: Linux's compressed kernel, entered through the 64-bit boot protocol.

Follows Documentation/arch/x86/boot.rst: needs protocol 2.12+ with ``XLF_KERNEL_64``; the
protected-mode part (after ``setup_sects`` + 1 sectors) goes to the preferred address (or, for
a relocatable kernel that does not fit there, the lowest ``kernel_alignment``-aligned address
from 1 MiB) with ``init_size`` bytes of RAM from there; the 64-bit entry point is 0x200 past
the load address. The setup header is kept for the zero page (``BootInfo.extra``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vmmkit.arch import BootInfo, MemoryLayout
from vmmkit.memory import MemoryRange
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64.loading import ImageFile, check_ram, cmdline_bytes, load_initramfs

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

from vmmkit.log import get_logger

log = get_logger()

MIN_VERSION: Final = 0x020C
LOADED_HIGH: Final = 1 << 0
XLF_KERNEL_64: Final = 1 << 0
ENTRY_64_OFFSET: Final = 0x200
KERNEL_VERSION: Final = 0x20E  #: setup header: the version string's offset from 0x200
SECTOR: Final = 512
DEFAULT_SETUP_SECTS: Final = 4
MAX_ALIGNMENT: Final = 1 << 30
#: initrd_addr_max when a kernel leaves it 0 (protocols before 2.03 had this fixed limit).
DEFAULT_INITRD_ADDR_MAX: Final = 0x37FFFFFF


def recognise(header: bytes) -> bool:
    return header[0x1FE:0x200] == b"\x55\xaa" and header[0x202:0x206] == b"HdrS"  # bootparams.HDRS


def _field(header: bytes, offset: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, header, offset)[0])


def load(path: Path, memory: GuestMemory, config: VmConfig, layout: MemoryLayout) -> BootInfo:
    from vmmkit_x86_64 import bootparams as Z  # here: a boot through PVH never needs it

    with path.open("rb") as stream:
        image = ImageFile(path, stream)
        first = image.read(0, Z.SETUP_HEADER_LIMIT, "the setup header")
        version = _field(first, Z.VERSION, "H")
        if version < MIN_VERSION:
            raise image.fail(
                f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old: vmmkit needs 2.12 or "
                "later with a 64-bit entry point"
            )
        xloadflags = _field(first, Z.XLOADFLAGS, "H")
        if not xloadflags & XLF_KERNEL_64:
            raise image.fail("this bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)")
        if not first[Z.LOADFLAGS] & LOADED_HIGH:
            raise image.fail("a zImage (loaded low) is not supported: build a bzImage")
        setup_sects = first[Z.SETUP_SECTS] or DEFAULT_SETUP_SECTS
        setup_size = (setup_sects + 1) * SECTOR
        header_end = 0x202 + first[0x201]
        if header_end > min(Z.SETUP_HEADER_LIMIT, setup_size):
            raise image.fail(f"not a valid bzImage: the setup header would end at {header_end:#x}")
        setup_header = first[Z.SETUP_HEADER : header_end]
        if setup_size >= image.size:
            raise image.fail(
                f"truncated: the file ({image.size} bytes) ends inside the {setup_size}-byte setup code"
            )
        kernel_size = image.size - setup_size
        syssize = _field(first, 0x1F4, "I") * 16
        if syssize > kernel_size:
            raise image.fail(
                f"truncated: the header promises {syssize} bytes of protected-mode kernel, the file "
                f"has {kernel_size}"
            )
        alignment = _field(first, Z.KERNEL_ALIGNMENT, "I")
        if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise image.fail(
                f"not a valid bzImage: kernel_alignment {alignment:#x} is not a power of two up to 1 GiB"
            )
        init_size = _field(first, Z.INIT_SIZE, "I")
        needed = max(init_size, kernel_size)
        relocatable = bool(first[Z.RELOCATABLE_KERNEL])
        pref_address = _field(first, Z.PREF_ADDRESS, "Q")
        load_address = _place(image, layout, relocatable, pref_address, alignment, needed)
        check_ram(path, layout, memory, load_address, needed, f"the kernel (init_size {needed:#x})")
        cmdline_max = min(_field(first, Z.CMDLINE_SIZE, "I"), L.CMDLINE_MAX_SIZE - 1)
        cmdline = cmdline_bytes(path, config.payload.cmdline, cmdline_max)
        linux = _is_linux(image, first)
        image.copy_to(memory, setup_size, load_address, kernel_size, "the protected-mode kernel")
    initrd_max = _field(first, Z.INITRD_ADDR_MAX, "I") or DEFAULT_INITRD_ADDR_MAX
    initramfs = load_initramfs(
        path, config, memory, layout, kernel_end=load_address + needed, limit=initrd_max + 1
    )
    entry = load_address + ENTRY_64_OFFSET
    log.debug("boot.kernel_loaded", path=str(path), format="bzimage", protocol="linux64", entry=hex(entry))
    return BootInfo(
        protocol="linux64",
        entry=entry,
        kernel=MemoryRange(load_address, needed),
        cmdline=cmdline,
        initramfs=initramfs,
        extra={
            "format": "bzimage",
            "setup_header": setup_header,
            "load_address": load_address,
            "boot_protocol": version,
            "cmdline_max": cmdline_max,
            "linux": linux,
        },
    )


def _is_linux(image: ImageFile, first: bytes) -> bool:
    """Whether the ``kernel_version`` string starts with a version number, as Linux's does
    ("6.1.192 (root@vm) #1 ..."); other bzImages (vmmkit's test guest) say something else."""
    pointer = _field(first, KERNEL_VERSION, "H")
    if not pointer or 0x200 + pointer >= image.size:
        return False
    return image.read(0x200 + pointer, 1, "the kernel version string")[:1].isdigit()


def _place(
    image: ImageFile, layout: MemoryLayout, relocatable: bool, pref_address: int, alignment: int, needed: int
) -> int:
    """The load address: ``pref_address`` when the kernel fits there, else (relocatable only) the
    lowest aligned address from 1 MiB."""
    low_end = layout.ram[0].end
    if not relocatable:
        return pref_address
    candidates = [_align_up(pref_address, alignment), _align_up(L.HIGH_RAM_START, alignment)]
    for candidate in candidates:
        if L.HIGH_RAM_START <= candidate and candidate + needed <= low_end:
            return candidate
    raise image.fail(
        f"the kernel needs {needed:#x} bytes of RAM from a {alignment:#x}-aligned address; "
        f"guest RAM below {low_end:#x} is too small"
    )


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
