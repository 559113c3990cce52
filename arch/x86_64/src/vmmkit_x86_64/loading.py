"""What every x86-64 kernel loader shares: bounded reads from an untrusted image, range checks
against guest RAM, the command line check and initramfs placement.

Every size and address taken from an image is checked against the file's length and the
guest's RAM before anything is read or written, so a hostile image can neither make the loader
write outside RAM nor allocate more host memory than a chunk.
"""

from __future__ import annotations

import os
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vmmkit.arch import MemoryLayout
from vmmkit.errors import BootError
from vmmkit.memory import MemoryRange
from vmmkit_x86_64 import layout as L

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

PAGE: Final = 4096
CHUNK: Final = 1 << 20
#: Where an initramfs may end when the kernel states no limit: below 4 GiB.
DEFAULT_INITRD_LIMIT: Final = L.FOUR_GIB


class ImageFile:
    """An open kernel image whose reads are checked against its length."""

    def __init__(self, path: Path, stream: BufferedReader) -> None:
        self.path = path
        self.stream = stream
        self.size = os.fstat(stream.fileno()).st_size

    def fail(self, reason: str) -> BootError:
        return BootError(self.path, reason)

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``; :class:`BootError` "truncated" if the file is shorter."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.fail(
                f"truncated: {what} ({length:#x} bytes at offset {offset:#x}) extends past the end "
                f"of the file ({self.size:#x} bytes)"
            )
        self.stream.seek(offset)
        data = self.stream.read(length)
        if len(data) != length:
            raise self.fail(f"truncated: {what} could not be read in full")
        return data

    def copy_to(self, memory: GuestMemory, offset: int, gpa: int, length: int, what: str) -> None:
        """Copy ``length`` bytes at file ``offset`` to guest ``gpa`` (already checked to be RAM)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.fail(f"truncated: {what} extends past the end of the file")
        copy_stream(self.stream, offset, memory, gpa, length, self.path, what)


def copy_stream(
    stream: BufferedReader, offset: int, memory: GuestMemory, gpa: int, length: int, path: Path, what: str
) -> None:
    stream.seek(offset)
    done = 0
    while done < length:
        view = memory.view(gpa + done, min(CHUNK, length - done))
        got = stream.readinto(view)
        if not got:
            raise BootError(path, f"truncated: {what} ended after {done:#x} of {length:#x} bytes")
        done += got


def zero(memory: GuestMemory, gpa: int, length: int) -> None:
    """Zero guest memory a chunk at a time (a segment's bss can be large)."""
    done = 0
    while done < length:
        piece = min(CHUNK, length - done)
        memory.write(gpa + done, bytes(piece))
        done += piece


def check_ram(
    path: Path, layout: MemoryLayout, memory: GuestMemory, start: int, size: int, what: str
) -> MemoryRange:
    """The RAM range holding ``[start, start + size)``; :class:`BootError` if there is none."""
    rng = L.ram_range_containing(layout, start, size) if start >= 0 and size >= 0 else None
    if rng is None or not memory.is_valid(start, max(size, 1)):
        ram = ", ".join(f"{r.start:#x}-{r.end:#x}" for r in layout.ram)
        raise BootError(path, f"{what} ({start:#x}-{start + size:#x}) lies outside guest RAM ({ram})")
    if start < L.HIGH_RAM_START:
        raise BootError(path, f"{what} ({start:#x}-{start + size:#x}) overlaps the boot area below 1 MiB")
    return rng


def cmdline_bytes(path: Path, cmdline: str | None, limit: int) -> bytes:
    """The command line as bytes, checked against ``limit`` (bytes without the NUL)."""
    data = (cmdline or "").encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise BootError(path, "the kernel command line contains a NUL byte")
    if len(data) > limit:
        raise BootError(
            path, f"the kernel command line is {len(data)} bytes; this kernel accepts at most {limit}"
        )
    return data


def load_initramfs(
    kernel_path: Path,
    config: VmConfig,
    memory: GuestMemory,
    layout: MemoryLayout,
    *,
    kernel_end: int,
    limit: int = DEFAULT_INITRD_LIMIT,
) -> MemoryRange | None:
    """Load ``config.payload.initramfs`` page-aligned as high as possible below ``limit``
    (exclusive; also below 4 GiB and the top of low RAM) and above ``kernel_end``."""
    name = config.payload.initramfs
    if not name:
        return None
    path = Path(name)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise BootError(path, f"cannot open the initramfs: {exc.strerror or exc}") from None
    with stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            raise BootError(path, "the initramfs is empty")
        top = min(limit, DEFAULT_INITRD_LIMIT, layout.ram[0].end)
        start = (top - size) & ~(PAGE - 1)
        floor = max(_align_up(kernel_end, PAGE), L.HIGH_RAM_START)
        if top - size < floor:
            raise BootError(
                path,
                f"the initramfs ({size} bytes) does not fit in guest RAM between the kernel's "
                f"end ({floor:#x}) and {top:#x}",
            )
        copy_stream(stream, 0, memory, start, size, path, "the initramfs")
    return MemoryRange(start, size)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
