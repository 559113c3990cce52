"""The vmmkit plugin: registers :class:`~vmmkit_emu.hypervisor.EmuHypervisor`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmmkit import hookimpl

if TYPE_CHECKING:
    from vmmkit.device import DeviceRequest
    from vmmkit.hypervisor import Hypervisor
    from vmmkit.registry import Registry


@hookimpl
def vmmkit_load_on_demand() -> bool:
    """Only an emu VM (``--hypervisor emu``, or ``auto`` with no usable hardware backend)
    needs this plugin: other boots do not import it."""
    return True


@hookimpl
def vmmkit_register_hypervisors(registry: Registry[type[Hypervisor]]) -> None:
    """Register the emulation backend (``--hypervisor emu``; ``auto`` tries it last)."""
    from vmmkit_emu.hypervisor import EmuHypervisor

    registry.add(EmuHypervisor)


@hookimpl
def vmmkit_platform_devices(machine: Any) -> Sequence[DeviceRequest] | None:
    """An x86 VM on emu gets its PC timer from a userspace 8254 (``i8254``): the backend
    models the interrupt controllers (I/O APIC, local APICs) but no PIT, as KVM's in-kernel
    PIT would be. Its IRQ 0 reaches I/O APIC pin 2."""
    from vmmkit.device import DeviceRequest

    x86 = sys.modules.get("vmmkit_emu.x86")  # an emu x86 VM has imported it; others need not
    if x86 is None or not isinstance(machine.vm, x86.X86Vm):
        return None
    return [DeviceRequest("i8254", "_pit", {"dilation": 1}, pio=(0x40, 4), irq=0)]
