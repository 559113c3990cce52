"""PCI: configuration spaces, MSI-X, the root complex of segment 0, and the modern virtio-pci
transport.

The machine reaches this package only through :func:`vmmkit.pci.virtio.attach_virtio_pci`
(called by ``vmmkit.virtio.transport.attach_virtio`` for transport ``"pci"``), which creates
the root on first use (:func:`vmmkit.pci.host.pci_root`, kept as ``machine.pci_root``).
"""

from vmmkit.pci.config import BarKind, PciBar, PciConfigSpace
from vmmkit.pci.function import PciFunction
from vmmkit.pci.host import PciRoot, pci_root
from vmmkit.pci.msix import MsixTable

__all__ = ["BarKind", "MsixTable", "PciBar", "PciConfigSpace", "PciFunction", "PciRoot", "pci_root"]
