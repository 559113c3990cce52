"""``vm.resize desired_balloon``: set the balloon's target, as Cloud Hypervisor's ``Vm::resize``
(``vmm/src/vm.rs``): the running VM's balloon device gets the new size (its driver is told with a
configuration-change interrupt and inflates or deflates towards it), and the stored
configuration's ``balloon.size`` follows so a reboot keeps it. On a VM created but not booted
(or shut down) only the configuration changes, as in Cloud Hypervisor. The event monitor
reports ``vm``/``resized``.

The device is reached through the device manager by id (``balloon.id``, else ``__balloon``) and
its :meth:`~vmmkit.virtio.device.VirtioDevice.resize`: the core knows no device plugin.

Refused, changing nothing: a size that is not a non-negative byte count or not below guest RAM
(400), a VM without ``--balloon`` (400), no VM (404).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs

from vmmkit.config import ConfigError
from vmmkit.errors import DeviceError

if TYPE_CHECKING:
    from vmmkit.vmm import Vmm

#: The balloon's device id when its configuration names none (Cloud Hypervisor's).
DEFAULT_BALLOON_ID: Final = "__balloon"


def check_balloon(vmm: Vmm, desired: object) -> None:
    """Raise as :func:`resize_balloon` would for ``desired``, changing nothing."""
    if not isinstance(desired, int) or isinstance(desired, bool) or desired < 0:
        raise ConfigError("desired_balloon", desired, "a balloon size in bytes (a non-negative integer)")
    with vmm._op_lock:
        config = vmm._require_config()
        balloon = config.balloon
        if balloon is None:
            raise ConfigError("desired_balloon", desired, "a VM with a balloon device",
                              reason="this VM has no balloon (create it with --balloon / \"balloon\")")
        if desired >= config.memory.boot_size:
            raise ConfigError("desired_balloon", desired, f"less than the memory size ({config.memory.boot_size})")
        machine = vmm._live_machine()
        if machine is not None:
            device_id = balloon.id or DEFAULT_BALLOON_ID
            if device_id not in machine.manager:
                raise DeviceError(f"the balloon device {device_id!r} is not in this VM")


def resize_balloon(vmm: Vmm, desired: object) -> None:
    """Give the VM's balloon the target ``desired`` (bytes).

    :raises ConfigError: a bad size, or no balloon configured (API 400).
    :raises NotCreated: no VM (API 404).
    """
    with vmm._op_lock:
        check_balloon(vmm, desired)
        assert isinstance(desired, int)
        config = vmm._require_config()
        balloon = config.balloon
        assert balloon is not None
        machine = vmm._live_machine()
        if machine is not None:
            machine.manager.resize(balloon.id or DEFAULT_BALLOON_ID, desired)
        with vmm._lock:
            if vmm.config is not None and vmm.config.balloon is not None:
                vmm.config = attrs.evolve(vmm.config, balloon=attrs.evolve(vmm.config.balloon, size=desired))
    vmm._event("vm", "resized")
