"""The plugin module vmmkit finds through the ``vmmkit`` entry point ``x86_64``.

One ``vmmkit_load_kernel`` implementation per image format; each returns ``None`` unless the
guest is x86-64 and it recognises the image. A last one (``trylast``) turns an x86-64 image no
loader recognised into a clear :class:`~vmmkit.errors.BootError`.

The loader modules are imported by the hooks, once the guest is x86-64: importing this module
(as every start does) imports no loader, and a boot imports only the loaders it tries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vmmkit import hookimpl
from vmmkit.errors import BootError
from vmmkit_x86_64.arch import X86_64

if TYPE_CHECKING:
    from vmmkit.arch import BootInfo, MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory
    from vmmkit.registry import Registry

ARCH = X86_64.name


@hookimpl
def vmmkit_register_architectures(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(X86_64)


@hookimpl(specname="vmmkit_load_kernel")
def load_elf(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """vmlinux and PVH kernels."""
    if arch != ARCH:
        return None
    from vmmkit_x86_64 import elf

    if not elf.recognise(header):
        return None
    return elf.load(Path(path), memory, config, layout)


@hookimpl(specname="vmmkit_load_kernel")
def load_bzimage(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """Linux bzImage (boot protocol 2.12+, 64-bit entry)."""
    if arch != ARCH:
        return None
    from vmmkit_x86_64 import bzimage

    if not bzimage.recognise(header):
        return None
    return bzimage.load(Path(path), memory, config, layout)


@hookimpl(specname="vmmkit_load_kernel", trylast=True)
def reject_unknown_image(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """Runs only when no loader took an x86-64 image: say what the image is not."""
    if arch != ARCH:
        return None
    from vmmkit_x86_64.loaders import UNRECOGNISED

    raise BootError(path, UNRECOGNISED)
