"""The AArch64 guest-physical layout: QEMU ``virt``'s low map (as Cloud Hypervisor's), RAM from 1 GiB.

::

    0x0800_0000  GICv3 distributor (64 KiB)
    0x0808_0000  GICv3 ITS             (128 KiB: control and translation frames) - MSIs, where
                                       the backend has one (KVM); PCI requester ID = device ID
    0x080A_0000  GICv3 redistributors (128 KiB per vCPU, up to 123 vCPUs below the UART)
    0x0900_0000  PL011 UART            SPI 1 (GSI 33), level
    0x0901_0000  PL031 RTC             SPI 2 (GSI 34), level
    0x0902_0000  debug-exit            a write sets the VMM's exit status (DT: "vmmkit,debug-exit")
    0x0903_0000  PSCI power page       not described to the guest: the page of the device that
                                       carries PSCI SYSTEM_OFF / SYSTEM_RESET to the machine
    0x0A00_0000  virtio-mmio devices   (32 MiB window), SPIs from 5 (GSI 37)
    0x1000_0000  PCI MMIO32 window     (512 MiB)
    0x3000_0000  PCI ECAM              (256 MiB)
    0x4000_0000  RAM                   (the kernel Image at RAM + text_offset; the DTB in the
                                       last 2 MiB of RAM, the initramfs just below it)

Interrupt numbers: vmmkit GSIs are GIC INTIDs, so SPI n is GSI 32 + n.
"""

from __future__ import annotations

from typing import Final

from vmmkit.arch import MemoryLayout
from vmmkit.memory import MemoryRange

GIB: Final = 1 << 30
MIB: Final = 1 << 20

GIC_DIST: Final = MemoryRange(0x0800_0000, 0x1_0000)
#: The ITS's two 64 KiB frames (GITS_TRANSLATER at +0x1_0040), as QEMU virt's.
GIC_ITS: Final = MemoryRange(0x0808_0000, 0x2_0000)
GIC_REDIST_BASE: Final = 0x080A_0000
GIC_REDIST_SIZE: Final = 0x2_0000  #: per vCPU (RD_base + SGI_base frames)
UART_PL011: Final = MemoryRange(0x0900_0000, 0x1000)
RTC_PL031: Final = MemoryRange(0x0901_0000, 0x1000)
DEBUG_EXIT: Final = MemoryRange(0x0902_0000, 0x1000)
PSCI_POWER: Final = MemoryRange(0x0903_0000, 0x1000)
DEVICE_MMIO: Final = MemoryRange(0x0A00_0000, 0x0200_0000)
PCI_MMIO32: Final = MemoryRange(0x1000_0000, 0x2000_0000)
PCI_ECAM: Final = MemoryRange(0x3000_0000, 0x1000_0000)
RAM_START: Final = 0x4000_0000
MAX_VCPUS: Final = (UART_PL011.start - GIC_REDIST_BASE) // GIC_REDIST_SIZE

SPI_BASE: Final = 32
UART_IRQ: Final = SPI_BASE + 1
RTC_IRQ: Final = SPI_BASE + 2
#: Generic timer PPIs (PPI numbers; INTID = 16 + n): secure, non-secure physical, virtual, hypervisor.
TIMER_PPIS: Final = (13, 14, 11, 10)

#: The DTB lives in the last 2 MiB of RAM (2 MiB aligned, as the arm64 boot protocol asks).
FDT_MAX_SIZE: Final = 2 * MIB


def gic_redistributors(cpus: int) -> MemoryRange:
    return MemoryRange(GIC_REDIST_BASE, GIC_REDIST_SIZE * cpus)


def memory_layout(ram_size: int) -> MemoryLayout:
    return MemoryLayout(
        ram=(MemoryRange(RAM_START, ram_size),),
        device_mmio=DEVICE_MMIO,
        pci_mmio32=PCI_MMIO32,
        pci_mmio64=MemoryRange(max(RAM_START + ram_size, 1 << 39), 1 << 38),
        pci_ecam=PCI_ECAM,
        pio=None,
        device_irqs=(SPI_BASE + 5, SPI_BASE + 63),
        msi_gsis=(SPI_BASE + 64, 1023),
    )
