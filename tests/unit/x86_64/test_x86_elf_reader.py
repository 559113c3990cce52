"""The ELF loader's struct-based reader against pyelftools, the reference: the header, every program
header field and the notes' owner, type and descriptor, on real kernels, synthetic ELF32/ELF64
images and mutated or truncated copies of the test guest."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmmkit_x86_64 import elf
from vmmkit_x86_64.layout import memory_layout
from vmmkit_x86_64.loading import ImageFile
from x86_helpers import build_elf, make_config

from vmmkit.errors import BootError
from vmmkit.memory import GuestMemory

pytest.importorskip("elftools", reason="pyelftools (the reference ELF reader, a test dependency) is not installed")

from elftools.common.utils import struct_parse  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402
from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE, ENUM_NOTE_N_TYPE, ENUM_P_TYPE_BASE  # noqa: E402
from elftools.elf.notes import iter_notes  # noqa: E402

#: ``(class, entry, program headers, notes)``.
Parsed = tuple[int, int, tuple[elf.ProgramHeader, ...], list[elf.Note]]


def ours(path: Path) -> Parsed:
    with path.open("rb") as stream:
        image = ImageFile(path, stream)
        elf_class, entry, headers = elf.read_elf(image)
        return elf_class, entry, headers, elf.read_notes(image, headers)


def reference(path: Path) -> tuple[int, int, tuple[elf.ProgramHeader, ...], list[elf.Note] | None]:
    """What pyelftools reads, notes ``None`` if :func:`reference_notes` finds them malformed. It
    reads the program headers only, as our loader does: ``ELFFile.iter_segments()`` would also read
    section headers for a PT_DYNAMIC segment."""
    with path.open("rb") as stream:
        ef = ELFFile(stream)
        headers = []
        for n in range(ef.num_segments()):
            h = struct_parse(ef.structs.Elf_Phdr, stream, stream_pos=ef["e_phoff"] + n * ef["e_phentsize"])
            fields = ("p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz", "p_align")
            headers.append(elf.ProgramHeader(_value(h["p_type"], ENUM_P_TYPE_BASE), *(h[f] for f in fields)))
        note_types = ENUM_CORE_NOTE_N_TYPE if ef["e_type"] == "ET_CORE" else ENUM_NOTE_N_TYPE
        notes: list[elf.Note] | None = []
        for h in headers:
            if h.type == elf.PT_NOTE and notes is not None:
                found = reference_notes(ef, h, note_types)
                notes = None if found is None else notes + found
        return ef.elfclass, ef["e_entry"], tuple(headers), notes


def reference_notes(ef: ELFFile, h: elf.ProgramHeader, note_types: dict[str, int]) -> list[elf.Note] | None:
    """The segment's notes as pyelftools reads them, or ``None`` where they are malformed and it
    reads them differently from us: past the segment's end, with a name that is not one
    NUL-terminated string, failing, or leaving out a 12-byte note that ends the segment."""
    if h.filesz > elf.MAX_NOTE_BYTES:
        return None  # we read only the first 64 KiB
    end = h.offset + h.filesz
    notes = []
    pos = h.offset
    try:
        for note in iter_notes(ef, h.offset, h.filesz):
            namesz = note["n_namesz"]
            if note["n_offset"] + 12 + _align4(namesz) + note["n_descsz"] > end:
                return None
            if namesz and namesz != len(note["n_name"]) + 1:
                return None  # a name that is not one NUL-terminated string
            owner = (note["n_name"] or "").encode("latin-1")
            notes.append((owner, _value(note["n_type"], note_types), bytes(note["n_descdata"])))
            pos = note["n_offset"] + note["n_size"]
    except Exception:  # pyelftools raises many types on malformed notes
        return None
    return None if end - pos == 12 else notes


def _value(name: str | int, enum: dict[str, int]) -> int:
    return enum[name] if isinstance(name, str) else name


def _align4(value: int) -> int:
    return (value + 3) & ~3


def assert_same(path: Path) -> Parsed:
    """Our reader and pyelftools agree on ``path``; our reading."""
    mine = ours(path)
    elf_class, entry, headers, notes = reference(path)
    assert mine[:3] == (elf_class, entry, headers)
    if notes is not None:
        assert mine[3] == notes
    return mine


# -- real kernels ------------------------------------------------------------------------------


def test_selftest_elf(selftest_dir: Path) -> None:
    path = selftest_dir / "selftest.elf"
    _, _, headers, notes = assert_same(path)
    assert reference(path)[3] is not None
    assert [h.type for h in headers].count(elf.PT_LOAD) >= 1
    assert (b"Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY) in [(owner, note_type) for owner, note_type, _ in notes]


def test_linux_vmlinux(linux_dir: Path) -> None:
    path = linux_dir / "vmlinux"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    _, entry, headers, notes = assert_same(path)
    assert reference(path)[3] is not None
    assert entry == 0x1000000
    assert sum(h.type == elf.PT_LOAD for h in headers) >= 2
    owners = {owner for owner, _, _ in notes}
    assert {b"GNU", b"Linux", b"Xen"} <= owners
    assert any(len(desc) % 4 for _, _, desc in notes)  # an unaligned descriptor (Linux's 1-byte "OPEN")


# -- synthetic images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"elf_class": 32, "pvh_entry": 0x100010},
        {"elf_class": 32, "pvh_entry": 0x100000, "linux": True},
        {"elf_class": 32},
        {"elf_class": 64, "pvh_entry": 0x100010, "linux": True},
        {"elf_class": 64, "vaddr_offset": 0xFFFFFFFF80000000},
    ],
    ids=["elf32-pvh", "elf32-pvh-linux", "elf32", "elf64-pvh-linux", "elf64-virtual"],
)
def test_synthetic_images(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    segments = [(0x100000, b"\x90" * 0x30, 0x1000), (0x300000, b"\xcc" * 0x1234, 0x5000)]
    path = tmp_path / "k.elf"
    path.write_bytes(build_elf(segments, entry=0x100000, **kwargs))
    elf_class, _, headers, notes = assert_same(path)
    assert elf_class == kwargs["elf_class"]
    assert [(h.paddr, h.filesz, h.memsz, h.flags) for h in headers[:2]] == [
        (0x100000, 0x30, 0x1000, 7),
        (0x300000, 0x1234, 0x5000, 7),
    ]
    assert len(notes) == ("pvh_entry" in kwargs) + bool(kwargs.get("linux"))


# -- hostile images ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(selftest_dir: Path) -> tuple[bytes, list[int]]:
    """The test guest's bytes and the offsets of the fields worth corrupting."""
    path = selftest_dir / "selftest.elf"
    data = path.read_bytes()
    _, _, headers, _ = reference(path)
    fields = [4, 5, 18, 24, 32, 54, 56]  # class, data, machine, entry, phoff, phentsize, phnum
    for n, h in enumerate(headers):
        fields += [64 + 56 * n + at for at in range(0, 56, 4)]
        if h.type == elf.PT_NOTE:
            fields += range(h.offset, h.offset + h.filesz, 4)
    return data, fields


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elf") / "mutated.elf"


@pytest.fixture(scope="module")
def guest_ram() -> Iterator[tuple[Any, GuestMemory]]:
    layout = memory_layout(64 << 20)
    with GuestMemory.allocate(layout.ram) as memory:
        yield layout, memory


INTERESTING = st.one_of(
    st.sampled_from([0, 1, 3, 4, 12, 0x38, 0x40, 0x7F, 0x80, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_selftest(
    pristine: tuple[bytes, list[int]], scratch: Path, guest_ram: tuple[Any, GuestMemory], data: st.DataObject
) -> None:
    """Both readers accept with equal results, or ours refuses with a BootError (never another
    exception), and so does the whole loader."""
    original, fields = pristine
    image = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        at = data.draw(st.sampled_from(fields), label="field")
        size = data.draw(st.sampled_from([1, 2, 4, 8]), label="size")
        value = data.draw(INTERESTING, label="value") & ((1 << 8 * size) - 1)
        image[at : at + size] = value.to_bytes(size, "little")
    if data.draw(st.booleans(), label="truncate"):
        image = image[: data.draw(st.integers(0, len(image)), label="length")]
    scratch.write_bytes(image)
    try:
        mine = ours(scratch)
    except BootError as exc:
        assert str(scratch) in str(exc)
    else:
        elf_class, entry, headers, notes = reference(scratch)
        assert mine[:3] == (elf_class, entry, headers)
        if notes is not None:
            assert mine[3] == notes
    layout, memory = guest_ram
    try:
        elf.load(scratch, memory, make_config(scratch), layout)
    except BootError as exc:
        assert str(scratch) in str(exc)


def test_truncated_at_every_structure_boundary(pristine: tuple[bytes, list[int]], scratch: Path) -> None:
    """Cut anywhere before the end of the last note: the reader needs every byte up to there."""
    original, fields = pristine
    for length in sorted({0, 4, 15, 16, 63, 64, *fields, *(f + 1 for f in fields), max(fields) + 3}):
        scratch.write_bytes(original[:length])
        with pytest.raises(BootError, match="truncated"):
            ours(scratch)


def test_note_walk_on_crafted_segments() -> None:
    """Names and descriptors are padded to 4 bytes; an empty trailing note counts (pyelftools
    skips a note that ends the segment with nothing but its header)."""
    xen = struct.pack("<III", 4, 1, 18) + b"Xen\0" + b"\x07\0\0\0"
    empty = struct.pack("<III", 0, 0, 5)
    assert elf.parse_notes(xen + empty) == [(b"Xen", 18, b"\x07"), (b"", 5, b"")]
    assert elf.parse_notes(xen[:-3]) == [(b"Xen", 18, b"\x07")]  # the descriptor's padding may be cut
    assert elf.parse_notes(xen[:-4]) == []
    assert elf.parse_notes(xen + b"\0" * 11) == [(b"Xen", 18, b"\x07")]
