"""The ELF loader: an uncompressed kernel (Linux's vmlinux, or any PVH kernel).

Segments are loaded at their physical addresses. An image with a Xen ``PHYS32_ENTRY`` note is
entered through PVH (protocol ``"pvh"``, 32-bit protected mode); otherwise a 64-bit ELF is
entered at ``e_entry`` with the 64-bit Linux boot protocol (``"linux64"``).

The file is read with :mod:`struct`: the ELF header, the program header table and the notes,
nothing else (section headers are never read). Every offset and size taken from the image is
checked against the file by :meth:`ImageFile.read`. pyelftools is the tests' reference.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple

from vmmkit.arch import BootInfo, MemoryLayout
from vmmkit.memory import MemoryRange
from vmmkit_x86_64 import layout as L
from vmmkit_x86_64.loading import ImageFile, check_ram, cmdline_bytes, load_initramfs, zero

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

from vmmkit.log import get_logger

log = get_logger()

ELF_MAGIC: Final = b"\x7fELF"
EM_386: Final = 3
EM_X86_64: Final = 62
PT_LOAD: Final = 1
PT_NOTE: Final = 4
XEN_ELFNOTE_PHYS32_ENTRY: Final = 18
MAX_PROGRAM_HEADERS: Final = 128
MAX_NOTE_BYTES: Final = 64 * 1024
#: Linux's COMMAND_LINE_SIZE on x86 is 2048 bytes with the NUL.
LINUX_CMDLINE_MAX: Final = 2047
OTHER_CMDLINE_MAX: Final = L.CMDLINE_MAX_SIZE - 1

#: The ELF header after ``e_ident``: type, machine, version, entry, phoff, shoff, flags, ehsize,
#: phentsize, phnum, shentsize, shnum, shstrndx.
_EHDR: Final = {32: struct.Struct("<HHIIIIIHHHHHH"), 64: struct.Struct("<HHIQQQIHHHHHH")}
#: ``Elf32_Phdr`` and ``Elf64_Phdr``: the fields are in a different order.
_PHDR: Final = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}

#: ``(owner, type, descriptor)``.
Note = tuple[bytes, int, bytes]


class ProgramHeader(NamedTuple):
    """An ``Elf32_Phdr`` or ``Elf64_Phdr`` (field names without ``p_``; a NamedTuple, as it is
    cheaper to define than an attrs class, which counts at start-up)."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def recognise(header: bytes) -> bool:
    return header[:4] == ELF_MAGIC


def load(path: Path, memory: GuestMemory, config: VmConfig, layout: MemoryLayout) -> BootInfo:
    with path.open("rb") as stream:
        image = ImageFile(path, stream)
        elf_class, elf_entry, headers = read_elf(image)
        notes = read_notes(image, headers)
        pvh_entry = _pvh_entry(image, notes)
        if pvh_entry is None and elf_class != 64:
            raise image.fail("a 32-bit ELF without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY): vmmkit cannot enter it")
        is_linux = any(owner == b"Linux" for owner, _, _ in notes)
        cmdline_max = LINUX_CMDLINE_MAX if is_linux else OTHER_CMDLINE_MAX
        cmdline = cmdline_bytes(path, config.payload.cmdline, cmdline_max)
        segments = _load_segments(image, headers, memory, layout)
        if pvh_entry is not None:
            protocol, entry = "pvh", pvh_entry
            if not _inside(entry, segments):
                raise image.fail(f"the PVH entry point {entry:#x} is not inside a loaded segment")
        else:
            protocol, entry = "linux64", _entry_address(image, elf_entry, headers, segments)
    kernel_start = min(s.start for s in segments)
    kernel_end = max(s.end for s in segments)
    initramfs = load_initramfs(path, config, memory, layout, kernel_end=kernel_end)
    log.debug("boot.kernel_loaded", path=str(path), format="elf", protocol=protocol, entry=hex(entry))
    return BootInfo(
        protocol=protocol,
        entry=entry,
        kernel=MemoryRange(kernel_start, kernel_end - kernel_start),
        cmdline=cmdline,
        initramfs=initramfs,
        extra={
            "format": "elf",
            "cmdline_max": cmdline_max,
            "elf_entry": elf_entry,
            "pvh_entry": pvh_entry,
            "linux": is_linux,
        },
    )


def read_elf(image: ImageFile) -> tuple[int, int, tuple[ProgramHeader, ...]]:
    """``(class, entry, program headers)`` of a little-endian x86 ELF (class 32 or 64);
    :class:`BootError` if it is something else."""
    ident = image.read(0, 16, "the ELF identification")
    elf_class = {1: 32, 2: 64}.get(ident[4])
    if elf_class is None:
        raise image.fail(f"not a valid ELF: unknown class {ident[4]}")
    if ident[5] != 1:
        raise image.fail("a big-endian ELF is not an x86 kernel")
    ehdr, phdr = _EHDR[elf_class], _PHDR[elf_class]
    raw = image.read(0, 16 + ehdr.size, "the ELF header")
    _, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_ = ehdr.unpack_from(raw, 16)
    expected = EM_X86_64 if elf_class == 64 else EM_386
    if machine != expected:
        raise image.fail(f"an ELF for machine {machine}, not x86 ({'EM_X86_64' if elf_class == 64 else 'EM_386'})")
    if phentsize != phdr.size:
        raise image.fail(f"not a valid ELF: program header size {phentsize}")
    if not 0 < phnum <= MAX_PROGRAM_HEADERS:
        raise image.fail(f"not a loadable ELF: {phnum} program headers")
    table = image.read(phoff, phnum * phentsize, "the program header table")
    if elf_class == 64:
        headers = tuple(map(ProgramHeader._make, phdr.iter_unpack(table)))
    else:  # Elf32_Phdr has p_flags after p_memsz
        headers = tuple(
            ProgramHeader(type_, flags, offset, vaddr, paddr, filesz, memsz, align)
            for type_, offset, vaddr, paddr, filesz, memsz, flags, align in phdr.iter_unpack(table)
        )
    return elf_class, entry, headers


def read_notes(image: ImageFile, headers: tuple[ProgramHeader, ...]) -> list[Note]:
    """Every note in the PT_NOTE segments (the first :data:`MAX_NOTE_BYTES` of each)."""
    notes = []
    for ph in headers:
        if ph.type == PT_NOTE:
            notes.extend(parse_notes(image.read(ph.offset, min(ph.filesz, MAX_NOTE_BYTES), "a note segment")))
    return notes


def parse_notes(data: bytes) -> list[Note]:
    """The notes in ``data``: a 12-byte header (namesz, descsz, type), the name and the
    descriptor, each padded to 4 bytes. A note that does not fit ends the walk."""
    notes = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        if desc_at + descsz > len(data):
            break
        notes.append((data[name_at : name_at + namesz].rstrip(b"\0"), note_type, data[desc_at : desc_at + descsz]))
        pos = desc_at + _align4(descsz)
    return notes


def _load_segments(
    image: ImageFile, headers: tuple[ProgramHeader, ...], memory: GuestMemory, layout: MemoryLayout
) -> list[MemoryRange]:
    loaded = []
    for number, ph in enumerate(headers):
        if ph.type != PT_LOAD or ph.memsz == 0:
            continue
        what = f"segment {number}"
        if ph.filesz > ph.memsz:
            raise image.fail(
                f"not a valid ELF: {what} has more file bytes ({ph.filesz:#x}) than memory ({ph.memsz:#x})"
            )
        if ph.offset + ph.filesz > image.size:
            raise image.fail(
                f"truncated: {what} extends past the end of the file ({ph.offset:#x}+{ph.filesz:#x} > {image.size:#x})"
            )
        check_ram(image.path, layout, memory, ph.paddr, ph.memsz, what)
        image.copy_to(memory, ph.offset, ph.paddr, ph.filesz, what)
        zero(memory, ph.paddr + ph.filesz, ph.memsz - ph.filesz)
        loaded.append(MemoryRange(ph.paddr, ph.memsz))
    if not loaded:
        raise image.fail("not a loadable ELF: no PT_LOAD segment")
    return loaded


def _pvh_entry(image: ImageFile, notes: list[Note]) -> int | None:
    for owner, note_type, desc in notes:
        if owner == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) not in (4, 8):
                raise image.fail(f"malformed PVH note: a {len(desc)}-byte entry address")
            entry = int.from_bytes(desc, "little")
            if entry >= L.FOUR_GIB:
                raise image.fail(f"the PVH entry point {entry:#x} is above 4 GiB")
            return entry
    return None


def _entry_address(
    image: ImageFile, entry: int, headers: tuple[ProgramHeader, ...], segments: list[MemoryRange]
) -> int:
    """``e_entry`` as a physical address: it is one in a vmlinux (``phys_startup_64``);
    otherwise translate it through the segment whose virtual range holds it."""
    if _inside(entry, segments):
        return entry
    for ph in headers:
        if ph.type == PT_LOAD and ph.vaddr <= entry < ph.vaddr + ph.memsz:
            return entry - ph.vaddr + ph.paddr
    raise image.fail(f"the entry point {entry:#x} is not inside a loaded segment")


def _inside(address: int, segments: list[MemoryRange]) -> bool:
    return any(s.contains(address) for s in segments)


def _align4(value: int) -> int:
    return (value + 3) & ~3
