"""The vmmkit plugin: registers :class:`~vmmkit_emu.hypervisor.EmuHypervisor`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmmkit import hookimpl

if TYPE_CHECKING:
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.registry import Registry


@hookimpl
def vmmkit_register_hypervisors(registry: Registry[type[Hypervisor]]) -> None:
    """Register the emulation backend (``--hypervisor emu``; ``auto`` tries it last)."""
    from vmmkit_emu.hypervisor import EmuHypervisor

    registry.add(EmuHypervisor)
