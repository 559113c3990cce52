"""PCI: configuration spaces, MSI-X, the root complex of a segment, and the modern virtio-pci
transport.

The device manager reaches this package through its ``pci`` and ``virtio-pci`` transports
(:mod:`vmmkit.transport`): :func:`vmmkit.pci.host.place_function` plugs a :class:`PciFunction`
(a plugin's own, or a :class:`vmmkit.pci.virtio.VirtioPciDevice`) into a segment's root, which
the manager creates on first use (:meth:`vmmkit.device_manager.DeviceManager.pci_segment`).
"""

from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import PciFunction
from vmmkit.pci.host import PciRoot
from vmmkit.pci.msix import MsixTable

__all__ = ["BarKind", "MsixTable", "PciBar", "PciConfigSpace", "PciFunction", "PciRoot"]
