"""The virtio device SDK: split virtqueues, the device interface, MMIO and PCI transports.

A device plugin subclasses :class:`VirtioDevice` and returns an instance from its device
type's ``create()``; the machine puts it behind the transport the configuration asks for.
"""

from vmmkit.virtio.device import ActivationContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType

__all__ = ["ActivationContext", "VirtioDevice", "VirtioInterrupt", "VirtioInterruptType"]
