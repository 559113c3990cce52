"""Is the payload a Linux kernel? The host quirks' kernel parameters are Linux's: other guests
(the project's test guests, unikernels) must get their command line untouched."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_PT_NOTE = 4
_MAX_NOTES = 1 << 20


def is_linux_kernel(path: str | Path) -> bool:
    """A vmlinux (an ELF with ``Linux`` notes) or a bzImage whose ``kernel_version`` string
    starts with a version number, as Linux's does; anything unreadable is not."""
    try:
        with open(path, "rb") as image:
            header = image.read(0x1000)
            if header[:4] == b"\x7fELF":
                return _elf_has_linux_note(image, header)
            return _bzimage_is_linux(image, header)
    except (OSError, struct.error, ValueError, IndexError):
        return False


def _bzimage_is_linux(image: BinaryIO, header: bytes) -> bool:
    if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
        return False
    offset = 0x200 + int.from_bytes(header[0x20E:0x210], "little")
    image.seek(offset)
    version = image.read(16)
    return version[:1].isdigit()


def _elf_has_linux_note(image: BinaryIO, header: bytes) -> bool:
    if header[4] != 2 or header[5] != 1:  # ELFCLASS64, little-endian
        return False
    phoff, = struct.unpack_from("<Q", header, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    image.seek(phoff)
    table = image.read(phentsize * phnum)
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, index * phentsize)
        if p_type != _PT_NOTE or p_filesz > _MAX_NOTES:
            continue
        image.seek(p_offset)
        notes = image.read(p_filesz)
        position = 0
        while position + 12 <= len(notes):
            namesz, descsz, _type = struct.unpack_from("<III", notes, position)
            name = notes[position + 12 : position + 12 + namesz].rstrip(b"\0")
            if name == b"Linux":
                return True
            position += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
