"""The ELF loader: an uncompressed kernel (Linux's vmlinux, or any PVH kernel).

Segments are loaded at their physical addresses. An image with a Xen ``PHYS32_ENTRY`` note is
entered through PVH (protocol ``"pvh"``, 32-bit protected mode); otherwise a 64-bit ELF is
entered at ``e_entry`` with the 64-bit Linux boot protocol (``"linux64"``).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

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


def recognise(header: bytes) -> bool:
    return header[:4] == ELF_MAGIC


def load(path: Path, memory: GuestMemory, config: VmConfig, layout: MemoryLayout) -> BootInfo:
    with path.open("rb") as stream:
        image = ImageFile(path, stream)
        elf = _parse(image)
        notes = _notes(image, elf)
        pvh_entry = _pvh_entry(image, notes)
        if pvh_entry is None and elf.elfclass != 64:
            raise image.fail(
                "a 32-bit ELF without a PVH note (XEN_ELFNOTE_PHYS32_ENTRY): vmmkit cannot enter it"
            )
        is_linux = any(owner == b"Linux" for owner, _, _ in notes)
        cmdline_max = LINUX_CMDLINE_MAX if is_linux else OTHER_CMDLINE_MAX
        cmdline = cmdline_bytes(path, config.payload.cmdline, cmdline_max)
        segments = _load_segments(image, elf, memory, layout)
        if pvh_entry is not None:
            protocol, entry = "pvh", pvh_entry
            if not _inside(entry, segments):
                raise image.fail(f"the PVH entry point {entry:#x} is not inside a loaded segment")
        else:
            protocol, entry = "linux64", _entry_address(image, elf, segments)
        elf_entry = elf.header["e_entry"]
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


def _parse(image: ImageFile) -> Any:
    ident = image.read(0, 16, "the ELF identification")
    elf_class = {1: 32, 2: 64}.get(ident[4])
    if elf_class is None:
        raise image.fail(f"not a valid ELF: unknown class {ident[4]}")
    if ident[5] != 1:
        raise image.fail("a big-endian ELF is not an x86 kernel")
    header_size = 64 if elf_class == 64 else 52
    raw = image.read(0, header_size, "the ELF header")
    machine = struct.unpack_from("<H", raw, 18)[0]
    expected = EM_X86_64 if elf_class == 64 else EM_386
    if machine != expected:
        raise image.fail(
            f"an ELF for machine {machine}, not x86 ({'EM_X86_64' if elf_class == 64 else 'EM_386'})"
        )
    if elf_class == 64:
        phoff, phentsize, phnum = struct.unpack_from("<Q", raw, 32)[0], *struct.unpack_from("<HH", raw, 54)
    else:
        phoff, phentsize, phnum = struct.unpack_from("<I", raw, 28)[0], *struct.unpack_from("<HH", raw, 42)
    if phentsize != (56 if elf_class == 64 else 32):
        raise image.fail(f"not a valid ELF: program header size {phentsize}")
    if not 0 < phnum <= MAX_PROGRAM_HEADERS:
        raise image.fail(f"not a loadable ELF: {phnum} program headers")
    image.read(phoff, phnum * phentsize, "the program header table")  # bounds check only
    from elftools.elf.elffile import ELFFile  # ~30 ms to import: only when an ELF is booted

    try:
        elf = ELFFile(image.stream)
        # Touch what we use now, so a parse error is reported here as a BootError.
        elf.header["e_entry"]
        [seg.header for seg in elf.iter_segments()]
    except Exception as exc:  # pyelftools raises many types on malformed input
        raise image.fail(f"not a valid ELF: {exc}") from None
    return elf


def _load_segments(
    image: ImageFile, elf: Any, memory: GuestMemory, layout: MemoryLayout
) -> list[MemoryRange]:
    loaded = []
    for number, segment in enumerate(elf.iter_segments()):
        h = segment.header
        if h["p_type"] != "PT_LOAD" or h["p_memsz"] == 0:
            continue
        offset, filesz, memsz, paddr = h["p_offset"], h["p_filesz"], h["p_memsz"], h["p_paddr"]
        what = f"segment {number}"
        if filesz > memsz:
            raise image.fail(
                f"not a valid ELF: {what} has more file bytes ({filesz:#x}) than memory ({memsz:#x})"
            )
        if offset + filesz > image.size:
            raise image.fail(
                f"truncated: {what} extends past the end of the file "
                f"({offset:#x}+{filesz:#x} > {image.size:#x})"
            )
        check_ram(image.path, layout, memory, paddr, memsz, what)
        image.copy_to(memory, offset, paddr, filesz, what)
        zero(memory, paddr + filesz, memsz - filesz)
        loaded.append(MemoryRange(paddr, memsz))
    if not loaded:
        raise image.fail("not a loadable ELF: no PT_LOAD segment")
    return loaded


def _notes(image: ImageFile, elf: Any) -> list[tuple[bytes, int, bytes]]:
    """``(owner, type, descriptor)`` of every note in the PT_NOTE segments."""
    notes = []
    for segment in elf.iter_segments():
        h = segment.header
        if h["p_type"] != "PT_NOTE":
            continue
        size = min(h["p_filesz"], MAX_NOTE_BYTES)
        data = image.read(h["p_offset"], size, "a note segment")
        notes.extend(parse_notes(data))
    return notes


def parse_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    notes = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(data):
            break  # a malformed note ends the walk
        notes.append(
            (data[name_at : name_at + namesz].rstrip(b"\0"), note_type, data[desc_at : desc_at + descsz])
        )
        pos = end
    return notes


def _pvh_entry(image: ImageFile, notes: list[tuple[bytes, int, bytes]]) -> int | None:
    for owner, note_type, desc in notes:
        if owner == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) not in (4, 8):
                raise image.fail(f"malformed PVH note: a {len(desc)}-byte entry address")
            entry = int.from_bytes(desc, "little")
            if entry >= L.FOUR_GIB:
                raise image.fail(f"the PVH entry point {entry:#x} is above 4 GiB")
            return entry
    return None


def _entry_address(image: ImageFile, elf: Any, segments: list[MemoryRange]) -> int:
    """``e_entry`` as a physical address: it is one in a vmlinux (``phys_startup_64``);
    otherwise translate it through the segment whose virtual range holds it."""
    entry = int(elf.header["e_entry"])
    if _inside(entry, segments):
        return entry
    for segment in elf.iter_segments():
        h = segment.header
        if h["p_type"] == "PT_LOAD" and h["p_vaddr"] <= entry < h["p_vaddr"] + h["p_memsz"]:
            return int(entry - h["p_vaddr"] + h["p_paddr"])
    raise image.fail(f"the entry point {entry:#x} is not inside a loaded segment")


def _inside(address: int, segments: list[MemoryRange]) -> bool:
    return any(s.contains(address) for s in segments)


def _align4(value: int) -> int:
    return (value + 3) & ~3
