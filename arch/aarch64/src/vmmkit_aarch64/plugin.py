"""The plugin module vmmkit finds through the ``vmmkit`` entry point ``aarch64``: the
architecture, the arm64 ``Image`` loader and the PSCI power device type.

Loaded on every host, x86 ones included: it imports only :mod:`.arch`, itself light; the loader
(:mod:`.image`) is imported when an Image is booted.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from vmmkit import hookimpl
from vmmkit.errors import BootError
from vmmkit_aarch64.arch import HEADER_SIZE, Aarch64, PsciPowerType, recognise

if TYPE_CHECKING:
    from pathlib import Path

    from vmmkit.arch import BootInfo, MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.memory import GuestMemory
    from vmmkit.registry import Registry

ARCH = Aarch64.name


@hookimpl
def vmmkit_register_architectures(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(Aarch64)


@hookimpl
def vmmkit_register_devices(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(PsciPowerType)


@hookimpl(specname="vmmkit_load_kernel")
def load_arm64_image(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """Linux arm64 ``Image`` (uncompressed, with the "ARM\\x64" header)."""
    if arch != ARCH or not recognise(header):
        return None
    from vmmkit_aarch64 import image

    return image.load(path, memory, config, layout)


@hookimpl(specname="vmmkit_load_kernel", trylast=True)
def reject_unknown_image(
    arch: str, path: Path, header: bytes, memory: GuestMemory, config: VmConfig, layout: MemoryLayout
) -> BootInfo | None:
    """Runs only when no loader took an AArch64 image: say what the image is not."""
    if arch != ARCH:
        return None
    if header[:4] == b"\x7fELF":
        raise BootError(path, "an ELF kernel (vmlinux) is not supported on AArch64: boot the arm64 Image")
    if header[:2] == b"\x1f\x8b":
        raise BootError(path, "a gzip-compressed Image (Image.gz) is not supported: decompress it first")
    raise BootError(path, "not an arm64 Image (no \"ARM\\x64\" magic at offset 0x38)")


@hookimpl
def vmmkit_configure(options: Any) -> None:
    """Without ``--arch``, an arm64 Image given to ``--kernel`` selects the aarch64 guest
    architecture (the machine would otherwise take the host's). Only the magic is read."""
    if getattr(options, "arch", "unset") is not None:
        return
    kernel = getattr(options, "kernel", None)
    if not kernel or not os.path.isfile(kernel):  # a FIFO would block open(); the machine reports it
        return
    try:
        with open(kernel, "rb") as stream:
            header = stream.read(HEADER_SIZE)
    except OSError:
        return  # the machine reports an unreadable kernel
    if recognise(header):
        options.arch = ARCH


@hookimpl
def vmmkit_vm_created(machine: Any) -> None:
    """A machine restored from a snapshot never ran :meth:`Aarch64.prepare_boot`: PSCI gets its
    RAM and power device here (a booted machine's already has them)."""
    arch = machine.arch
    if isinstance(arch, Aarch64) and arch.psci.power is None and machine.layout is not None:
        arch.attach_firmware(machine.layout.ram, machine.devices)
