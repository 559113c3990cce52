"""The x86-64 kernel loaders, in the order they are tried, and a fallback that names them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vmmkit.arch import BootInfo, MemoryLayout
from vmmkit.errors import BootError
from vmmkit_x86_64 import bzimage, elf

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory

Loader = Callable[[Path, "GuestMemory", "VmConfig", MemoryLayout], BootInfo]

#: ``(format name, recogniser of the first bytes, loader)``.
LOADERS: Final[tuple[tuple[str, Callable[[bytes], bool], Loader], ...]] = (
    ("elf", elf.recognise, elf.load),
    ("bzimage", bzimage.recognise, bzimage.load),
)
UNRECOGNISED: Final = "not an ELF, bzImage or PVH kernel"


def load_kernel(
    path: Path, memory: GuestMemory, config: VmConfig, layout: MemoryLayout, header: bytes | None = None
) -> BootInfo:
    """Load ``path`` with whichever loader recognises it.

    :raises BootError: no loader does, or the image is corrupt or does not fit.
    """
    path = Path(path)
    if header is None:
        header = read_header(path)
    for _name, recognise, load in LOADERS:
        if recognise(header):
            return load(path, memory, config, layout)
    raise BootError(path, UNRECOGNISED)


def read_header(path: Path, size: int = 64 * 1024) -> bytes:
    try:
        with Path(path).open("rb") as stream:
            return stream.read(size)
    except OSError as exc:
        raise BootError(path, exc.strerror or str(exc)) from None
