"""Virtio devices on vmmkit's device SDK (:mod:`vmmkit.virtio`): block, net, console, entropy,
memory balloon, vsock.

Each module holds a device (a :class:`vmmkit.virtio.VirtioDevice`, put behind virtio-mmio or
virtio-pci by the machine as ``DeviceRequest.transport`` says) and the ``create()`` of its
registered device type (declared in :mod:`vmmkit_devices.device_types`):

=================  ==================================  ====================================
type name          device                              configuration
=================  ==================================  ====================================
``virtio-blk``     :class:`.block.BlockDevice`         one per ``VmConfig.disks`` entry
``virtio-net``     :class:`.net.NetDevice`             one per ``VmConfig.net`` entry
``virtio-console`` :class:`.console.ConsoleDevice`     ``VmConfig.console`` unless ``Off``
``virtio-rng``     :class:`.rng.RngDevice`             ``VmConfig.rng`` (always)
``virtio-balloon`` :class:`.balloon.BalloonDevice`     ``VmConfig.balloon`` (if set)
``virtio-vsock``   :class:`.vsock.device.VsockDevice`  ``VmConfig.vsock`` (hybrid vsock)
=================  ==================================  ====================================

:mod:`.common` is what they share (serving queues, lifecycle, failing safely); :mod:`.blk_io`
the block data path (C through cffi, with the Python reference); :mod:`.tap` TAP interfaces.

Importing this package imports none of them: the names below are loaded on first use, so a VM
without a disk never loads the block path's native module.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmmkit_devices.device_types import (
        VirtioBalloonType,
        VirtioBlockType,
        VirtioConsoleType,
        VirtioNetType,
        VirtioRngType,
    )
    from vmmkit_devices.virtio.balloon import BalloonDevice
    from vmmkit_devices.virtio.block import BlockDevice
    from vmmkit_devices.virtio.console import ConsoleDevice
    from vmmkit_devices.virtio.net import NetDevice
    from vmmkit_devices.virtio.rng import RngDevice

_HOMES = {
    "BalloonDevice": f"{__name__}.balloon",
    "VirtioBalloonType": "vmmkit_devices.device_types",
    "BlockDevice": f"{__name__}.block",
    "ConsoleDevice": f"{__name__}.console",
    "NetDevice": f"{__name__}.net",
    "RngDevice": f"{__name__}.rng",
    "VirtioBlockType": "vmmkit_devices.device_types",
    "VirtioConsoleType": "vmmkit_devices.device_types",
    "VirtioNetType": "vmmkit_devices.device_types",
    "VirtioRngType": "vmmkit_devices.device_types",
}

__all__ = [
    "BalloonDevice",
    "VirtioBalloonType",
    "BlockDevice",
    "ConsoleDevice",
    "NetDevice",
    "RngDevice",
    "VirtioBlockType",
    "VirtioConsoleType",
    "VirtioNetType",
    "VirtioRngType",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(home), name)
