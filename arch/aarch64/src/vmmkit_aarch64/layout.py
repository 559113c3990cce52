"""The AArch64 guest-physical layout (Cloud Hypervisor's, RAM from 1 GiB)."""

from __future__ import annotations

from vmmkit.arch import MemoryLayout
from vmmkit.memory import MemoryRange

GIB = 1 << 30
MIB = 1 << 20

GIC_DIST = 0x0800_0000
UART_PL011 = 0x0900_0000
RTC_PL031 = 0x0901_0000
DEVICE_MMIO = MemoryRange(0x0A00_0000, 0x0200_0000)
PCI_ECAM = MemoryRange(0x3000_0000, 0x1000_0000)
PCI_MMIO32 = MemoryRange(0x1000_0000, 0x2000_0000)
RAM_START = 0x4000_0000


def memory_layout(ram_size: int) -> MemoryLayout:
    return MemoryLayout(
        ram=(MemoryRange(RAM_START, ram_size),),
        device_mmio=DEVICE_MMIO,
        pci_mmio32=PCI_MMIO32,
        pci_mmio64=MemoryRange(max(RAM_START + ram_size, 1 << 39), 1 << 38),
        pci_ecam=PCI_ECAM,
        pio=None,
        device_irqs=(32 + 5, 32 + 63),
        msi_gsis=(32 + 64, 1023),
    )
