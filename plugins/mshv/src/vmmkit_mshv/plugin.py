from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmmkit import hookimpl
from vmmkit.registry import Registry
from vmmkit_mshv.hypervisor import MshvHypervisor

if TYPE_CHECKING:
    from vmmkit.device import DeviceRequest


@hookimpl
def vmmkit_load_on_demand() -> bool:
    """Only an MSHV VM needs this plugin: other boots do not import it."""
    return True


@hookimpl
def vmmkit_register_hypervisors(registry: Registry) -> None:  # type: ignore[type-arg]
    registry.add(MshvHypervisor)


@hookimpl
def vmmkit_platform_devices(machine: Any) -> Sequence[DeviceRequest] | None:
    """The PC timer: the Microsoft Hypervisor emulates none, so an MSHV VM gets a userspace
    8254 (``i8254``), its IRQ 0 on I/O APIC pin 2."""
    from vmmkit.device import DeviceRequest

    vm_module = sys.modules.get("vmmkit_mshv.vm")  # an MSHV VM has imported it; others need not
    if vm_module is None or not isinstance(machine.vm, vm_module.MshvVm):
        return None
    return [DeviceRequest("i8254", "_pit", {"dilation": 1}, pio=(0x40, 4), irq=0)]
