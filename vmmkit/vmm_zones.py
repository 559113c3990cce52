"""``vm.resize-zone`` on the VMM (Cloud Hypervisor's ``Vm::resize_zone``): one memory zone's
virtio-mem device is resized (:class:`vmmkit.memory_zones.ZoneHotplug`) and the stored
configuration's zone follows (``hotplugged_size``), so ``vm.info`` shows it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from vmmkit.config import ConfigError
from vmmkit.machine import MachineState

if TYPE_CHECKING:
    from vmmkit.vmm import Vmm


def resize_zone(vmm: Vmm, zone_id: str, desired_ram: int) -> None:
    """See :meth:`vmmkit.vmm.Vmm.resize_zone`."""
    from vmmkit.vmm import InvalidState

    if type(zone_id) is not str or not zone_id:
        raise ConfigError("id", zone_id, "the id of a memory zone")
    if type(desired_ram) is not int or desired_ram < 0:
        raise ConfigError("desired_ram", desired_ram, "a size in bytes")
    with vmm._op_lock:
        config = vmm._require_config()
        zones = {zone.id: zone for zone in config.memory.zones}
        if zone_id not in zones:
            raise ConfigError("id", zone_id, f"a memory zone of this VM ({', '.join(zones) or 'it has none'})")
        machine = vmm._live_machine()
        if machine is None or machine.state is not MachineState.RUNNING:
            state = machine.state.value if machine is not None else "not booted"
            raise InvalidState(f"cannot resize a memory zone of a VM that is {state}")
        zone = zones[zone_id]
        machine.resize_zone(zone_id, desired_ram, check_only=True)  # refused before the "resizing" event
        vmm._event("vm", "resizing")
        machine.resize_zone(zone_id, desired_ram)
        extra = desired_ram - zone.size
        resized = attrs.evolve(zone, hotplugged_size=extra if extra > 0 else None)
        memory = attrs.evolve(config.memory, zones=tuple(resized if z.id == zone_id else z
                                                         for z in config.memory.zones))
        with vmm._lock:
            if vmm.config is not None:
                vmm.config = attrs.evolve(vmm.config, memory=memory)
        vmm._event("vm", "resized")
