"""The Linux zero page (``struct boot_params``, Documentation/arch/x86/zero-page.rst).

For a bzImage the setup header from the image is copied in (bytes 0x1f1 up to the end the
image declares) and the loader's fields filled; for a vmlinux a minimal header is made up, as
Cloud Hypervisor does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from vmmkit_x86_64.e820 import MAX_ENTRIES, E820Entry

ZERO_PAGE_SIZE: Final = 4096

# boot_params offsets
ACPI_RSDP_ADDR: Final = 0x070
EXT_RAMDISK_IMAGE: Final = 0x0C0
EXT_RAMDISK_SIZE: Final = 0x0C4
EXT_CMD_LINE_PTR: Final = 0x0C8
E820_ENTRIES: Final = 0x1E8
SENTINEL: Final = 0x1EF
SETUP_HEADER: Final = 0x1F1
SETUP_HEADER_LIMIT: Final = 0x290  #: edd_mbr_sig_buffer follows the header's padding
E820_TABLE: Final = 0x2D0

# setup_header fields (as zero-page offsets)
SETUP_SECTS: Final = 0x1F1
BOOT_FLAG: Final = 0x1FE
HEADER_MAGIC: Final = 0x202
VERSION: Final = 0x206
TYPE_OF_LOADER: Final = 0x210
LOADFLAGS: Final = 0x211
CODE32_START: Final = 0x214
RAMDISK_IMAGE: Final = 0x218
RAMDISK_SIZE: Final = 0x21C
CMD_LINE_PTR: Final = 0x228
INITRD_ADDR_MAX: Final = 0x22C
KERNEL_ALIGNMENT: Final = 0x230
RELOCATABLE_KERNEL: Final = 0x234
MIN_ALIGNMENT: Final = 0x235
XLOADFLAGS: Final = 0x236
CMDLINE_SIZE: Final = 0x238
HARDWARE_SUBARCH: Final = 0x23C
PREF_ADDRESS: Final = 0x258
INIT_SIZE: Final = 0x260

BOOT_FLAG_MAGIC: Final = 0xAA55
HDRS: Final = b"HdrS"
LOADER_UNDEFINED: Final = 0xFF  #: type_of_loader: a boot loader without an assigned ID
VMLINUX_ALIGNMENT: Final = 0x1000000


def zero_page(
    *,
    setup_header: bytes | None,
    load_address: int | None,
    cmdline_address: int,
    cmdline_size: int,
    initramfs: tuple[int, int] | None,
    e820: Sequence[E820Entry],
    rsdp_address: int,
) -> bytes:
    """The 4 KiB zero page.

    :param setup_header: the image's setup header (from 0x1f1), or ``None`` for a vmlinux.
    :param cmdline_size: the command line's length without its NUL (used for a vmlinux).
    """
    page = bytearray(ZERO_PAGE_SIZE)

    def put(offset: int, fmt: str, value: int | bytes) -> None:
        struct.pack_into("<" + fmt, page, offset, value)

    if setup_header is not None:
        if SETUP_HEADER + len(setup_header) > SETUP_HEADER_LIMIT:
            raise ValueError("setup header runs past its place in the zero page")
        page[SETUP_HEADER : SETUP_HEADER + len(setup_header)] = setup_header
        if load_address is not None:
            put(CODE32_START, "I", load_address)
    else:
        put(BOOT_FLAG, "H", BOOT_FLAG_MAGIC)
        put(HEADER_MAGIC, "4s", HDRS)
        put(KERNEL_ALIGNMENT, "I", VMLINUX_ALIGNMENT)
        put(CMDLINE_SIZE, "I", cmdline_size)
    put(TYPE_OF_LOADER, "B", LOADER_UNDEFINED)
    put(CMD_LINE_PTR, "I", cmdline_address & 0xFFFFFFFF)
    put(EXT_CMD_LINE_PTR, "I", cmdline_address >> 32)
    if initramfs is not None:
        start, size = initramfs
        put(RAMDISK_IMAGE, "I", start & 0xFFFFFFFF)
        put(RAMDISK_SIZE, "I", size & 0xFFFFFFFF)
        put(EXT_RAMDISK_IMAGE, "I", start >> 32)
        put(EXT_RAMDISK_SIZE, "I", size >> 32)
    put(ACPI_RSDP_ADDR, "Q", rsdp_address)
    put(SENTINEL, "B", 0)
    if len(e820) > MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries do not fit the zero page")
    put(E820_ENTRIES, "B", len(e820))
    for i, entry in enumerate(e820):
        page[E820_TABLE + 20 * i : E820_TABLE + 20 * (i + 1)] = entry.pack()
    return bytes(page)
