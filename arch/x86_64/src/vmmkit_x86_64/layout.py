"""The guest-physical map of an x86-64 vmmkit VM (modelled on Cloud Hypervisor's).

Below 1 MiB (boot structures, all written by :mod:`vmmkit_x86_64.boot`)::

    0x00500  GDT (up to 8 entries)             0x00540  IDT (empty)
    0x06000  PVH module list                   0x06100  PVH memory map (128 entries)
    0x07000  zero page (linux64) or hvm_start_info (pvh)
    0x08000  boot stack page (RSP = 0x8ff0)
    0x09000  PML4     0x0a000  PDPT     0x0b000-0x0efff  4 page directories (2 MiB pages, 4 GiB)
    0x20000  kernel command line (at most 64 KiB)
    0x9fc00  EBDA: Intel MP floating pointer and configuration table   } e820 reserved
    0xe0000  ACPI: RSDP, then XSDT, FADT, MADT, MCFG, DSDT up to 1 MiB  }

Above::

    1 MiB .. 3 GiB         RAM (the kernel and the initramfs live here)
    0xc000_0000  128 MiB   device MMIO window (virtio-mmio; at its top the PCI hotplug
                           registers, 0xc7ff_e000, and the ACPI GED, 0xc7ff_f000; the CPU
                           hotplug registers at 0xc7ff_c000)
    0xc800_0000  512 MiB   PCI MMIO32 window
    0xe800_0000  256 MiB   PCI ECAM (MCFG), one segment, buses 0-255 (e820 reserved)
    0xf800_0000            hypervisor-private pages (KVM TSS and identity map), outside every window
    0xfec0_0000            IOAPIC              0xfee0_0000  local APICs
    4 GiB ..               the rest of the RAM
    hotplug RAM            with ``--memory hotplug_size=``: from 4 GiB if all RAM is below
                           3 GiB, else from the end of RAM rounded up to 128 MiB (Cloud
                           Hypervisor's ``MemoryManager::start_addr``); not in the e820 map
    above it (1 GiB aligned)   PCI MMIO64 window (64 GiB, clipped to max_phys_bits)

The ACPI memory hotplug registers (MHPC, 0x18 bytes) are at 0xc7ffd000, when there is
hotplug RAM.

I/O ports 0x0-0xfff are legacy (platform devices, PCI config at 0xcf8); PCI I/O BARs get
0x1000-0xffff. Legacy IRQs 5-23 go to devices (the machine skips those platform devices take,
see :mod:`vmmkit_x86_64.platform`); MSI routes use GSIs 24-1023.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from vmmkit.arch import MemoryLayout
from vmmkit.errors import VmmError
from vmmkit.memory import MemoryRange

if TYPE_CHECKING:
    from vmmkit.config import VmConfig

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

# -- below 1 MiB ------------------------------------------------------------------------------
BOOT_GDT_START: Final = 0x500
BOOT_GDT_MAX_ENTRIES: Final = 8
BOOT_IDT_START: Final = 0x540
PVH_MODLIST_START: Final = 0x6000
PVH_MEMMAP_START: Final = 0x6100
PVH_MEMMAP_MAX_ENTRIES: Final = 128
ZERO_PAGE_START: Final = 0x7000
PVH_INFO_START: Final = 0x7000
BOOT_STACK_POINTER: Final = 0x8FF0
PML4_START: Final = 0x9000
PDPT_START: Final = 0xA000
PD_START: Final = 0xB000
PAGE_TABLES_END: Final = 0xF000
CMDLINE_START: Final = 0x20000
CMDLINE_MAX_SIZE: Final = 0x10000  #: bytes, including the terminating NUL
EBDA_START: Final = 0x9FC00
MPTABLE_START: Final = EBDA_START
VGA_START: Final = 0xA0000
BIOS_START: Final = 0xE0000  #: the RSDP lives here (ACPI: the OS scans 0xe0000-0xfffff)
RSDP_START: Final = BIOS_START
ACPI_END: Final = 0x100000
HIGH_RAM_START: Final = 0x100000  #: kernels and initramfs are loaded at or above 1 MiB

# -- the 32-bit hole --------------------------------------------------------------------------
LOW_RAM_END: Final = 3 * GiB
DEVICE_MMIO: Final = MemoryRange(0xC000_0000, 128 * MiB)
PCI_MMIO32: Final = MemoryRange(0xC800_0000, 512 * MiB)
PCI_ECAM: Final = MemoryRange(0xE800_0000, 256 * MiB)
#: Pages a backend may give its hypervisor (KVM_SET_TSS_ADDR takes 3 pages, the identity map
#: one more); nothing else is placed here.
HYPERVISOR_PRIVATE: Final = MemoryRange(0xF800_0000, 16 * KiB)
IOAPIC_START: Final = 0xFEC0_0000
IOAPIC_SIZE: Final = 0x1000
APIC_START: Final = 0xFEE0_0000
APIC_SIZE: Final = 0x10_0000
FOUR_GIB: Final = 4 * GiB

#: The ACPI PCI hotplug registers (PCIU/PCID/B0EJ/PSEG): the page below the ACPI GED's, at the
#: top of the device MMIO window.
PCI_HOTPLUG: Final = MemoryRange(DEVICE_MMIO.end - 0x2000, 0x10)
#: The ACPI CPU hotplug registers (CSEL/CPEN/CINS/CRMV/CEJ0, :mod:`vmmkit.cpu_hotplug`), 12
#: bytes in their own page further down.
CPU_HOTPLUG: Final = MemoryRange(DEVICE_MMIO.end - 0x4000, 0xC)

#: The ACPI memory hotplug registers (:mod:`vmmkit.acpi.memory_hotplug`), in the device MMIO
#: window's third page from the top (the fourth has the CPU hotplug registers).
MEMORY_HOTPLUG_REGISTERS: Final = MemoryRange(DEVICE_MMIO.end - 0x3000, 0x18)
#: Hotplug RAM starts on a Linux memory block (section) boundary.
MEMORY_HOTPLUG_ALIGN: Final = 128 * MiB

PCI_MMIO64_SIZE: Final = 64 * GiB
PCI_MMIO64_ALIGN: Final = 1 * GiB

# -- ports and interrupts ---------------------------------------------------------------------
PCI_PIO: Final = MemoryRange(0x1000, 0x10000 - 0x1000)
DEVICE_IRQS: Final = (5, 23)
MSI_GSIS: Final = (24, 1023)
IOAPIC_PINS: Final = 24

#: The smallest RAM the layout accepts: the boot area below 1 MiB plus room for a kernel.
MIN_RAM: Final = 2 * MiB


def memory_layout(size: int, max_phys_bits: int = 46, hotplug_size: int = 0) -> MemoryLayout:
    """The layout for ``size`` bytes of RAM: ``[0, min(size, 3 GiB))``, the rest from 4 GiB;
    then ``hotplug_size`` bytes for memory hotplug, if any.

    :raises VmmError: ``size`` is below :data:`MIN_RAM` or not page aligned.
    """
    if size < MIN_RAM or size % (4 * KiB):
        raise VmmError(
            f"x86-64 guests need at least {MIN_RAM // MiB} MiB of RAM in whole pages (got {size} bytes)"
        )
    low = min(size, LOW_RAM_END)
    ram = [MemoryRange(0, low)]
    if size > low:
        ram.append(MemoryRange(FOUR_GIB, size - low))
    ram_end = ram[-1].end
    hotplug = None
    if hotplug_size > 0:
        start = FOUR_GIB if ram_end <= LOW_RAM_END else _align_up(ram_end, MEMORY_HOTPLUG_ALIGN)
        hotplug = MemoryRange(start, hotplug_size)
        ram_end = hotplug.end
        if ram_end > 1 << max_phys_bits:
            raise VmmError(f"RAM and hotplug_size end at {ram_end:#x}, beyond the guest's "
                           f"{max_phys_bits}-bit physical address space")
    mmio64_start = _align_up(max(ram_end, FOUR_GIB), PCI_MMIO64_ALIGN)
    mmio64_end = min(mmio64_start + PCI_MMIO64_SIZE, 1 << max_phys_bits)
    mmio64 = MemoryRange(mmio64_start, mmio64_end - mmio64_start) if mmio64_end > mmio64_start else None
    return MemoryLayout(
        ram=tuple(ram),
        device_mmio=DEVICE_MMIO,
        pci_mmio32=PCI_MMIO32,
        pci_mmio64=mmio64,
        pci_ecam=PCI_ECAM,
        pio=PCI_PIO,
        device_irqs=DEVICE_IRQS,
        pci_hotplug=PCI_HOTPLUG,
        cpu_hotplug=CPU_HOTPLUG,
        msi_gsis=MSI_GSIS,
        memory_hotplug=hotplug,
        memory_hotplug_registers=MEMORY_HOTPLUG_REGISTERS if hotplug is not None else None,
    )


def layout_for(config: VmConfig) -> MemoryLayout:
    return memory_layout(config.memory.boot_size, config.cpus.max_phys_bits, config.memory.hotplug_area_size)


def fixed_regions(layout: MemoryLayout) -> dict[str, MemoryRange]:
    """Every named guest-physical placement of the layout (for overlap checks and reports)."""
    regions = {f"ram{i}": r for i, r in enumerate(layout.ram)}
    regions["device_mmio"] = layout.device_mmio
    if layout.memory_hotplug is not None:
        regions["memory_hotplug"] = layout.memory_hotplug
    for name in ("pci_mmio32", "pci_mmio64", "pci_ecam"):
        value = getattr(layout, name)
        if value is not None:
            regions[name] = value
    regions["hypervisor_private"] = HYPERVISOR_PRIVATE
    regions["ioapic"] = MemoryRange(IOAPIC_START, IOAPIC_SIZE)
    regions["lapic"] = MemoryRange(APIC_START, APIC_SIZE)
    return regions


def boot_area() -> dict[str, MemoryRange]:
    """The boot structures below 1 MiB (for overlap checks and reports)."""
    return {
        "gdt": MemoryRange(BOOT_GDT_START, BOOT_GDT_MAX_ENTRIES * 8),
        "idt": MemoryRange(BOOT_IDT_START, 8),
        "pvh_modlist": MemoryRange(PVH_MODLIST_START, PVH_MEMMAP_START - PVH_MODLIST_START),
        "pvh_memmap": MemoryRange(PVH_MEMMAP_START, PVH_MEMMAP_MAX_ENTRIES * 24),
        "zero_page": MemoryRange(ZERO_PAGE_START, 0x1000),
        "stack": MemoryRange(BOOT_STACK_POINTER + 0x10 - 0x1000, 0x1000),
        "page_tables": MemoryRange(PML4_START, PAGE_TABLES_END - PML4_START),
        "cmdline": MemoryRange(CMDLINE_START, CMDLINE_MAX_SIZE),
        "mptable": MemoryRange(MPTABLE_START, BIOS_START - MPTABLE_START),
        "acpi": MemoryRange(BIOS_START, ACPI_END - BIOS_START),
    }


def ram_range_containing(layout: MemoryLayout, start: int, size: int) -> MemoryRange | None:
    """The RAM range holding all of ``[start, start + size)``, if one does."""
    for rng in layout.ram:
        if size >= 0 and rng.contains(start, max(size, 1)):
            return rng
    return None


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
