"""Virtio devices on vmmkit's device SDK (:mod:`vmmkit.virtio`): block, net, console, entropy.

Each module holds a device (a :class:`vmmkit.virtio.VirtioDevice`, put behind virtio-mmio or
virtio-pci by the machine as ``DeviceRequest.transport`` says) and its registered device type:

=================  ==================================  ====================================
type name          device                              configuration
=================  ==================================  ====================================
``virtio-blk``     :class:`.block.BlockDevice`         one per ``VmConfig.disks`` entry
``virtio-net``     :class:`.net.NetDevice`             one per ``VmConfig.net`` entry
``virtio-console`` :class:`.console.ConsoleDevice`     ``VmConfig.console`` unless ``Off``
``virtio-rng``     :class:`.rng.RngDevice`             ``VmConfig.rng`` (always)
=================  ==================================  ====================================

:mod:`.common` is what they share (serving queues, lifecycle, failing safely); :mod:`.blk_io`
the block data path (C through cffi, with the Python reference); :mod:`.tap` TAP interfaces.
"""

from vmmkit_devices.virtio.block import BlockDevice, VirtioBlockType
from vmmkit_devices.virtio.console import ConsoleDevice, VirtioConsoleType
from vmmkit_devices.virtio.net import NetDevice, VirtioNetType
from vmmkit_devices.virtio.rng import RngDevice, VirtioRngType

__all__ = [
    "BlockDevice",
    "ConsoleDevice",
    "NetDevice",
    "RngDevice",
    "VirtioBlockType",
    "VirtioConsoleType",
    "VirtioNetType",
    "VirtioRngType",
]
