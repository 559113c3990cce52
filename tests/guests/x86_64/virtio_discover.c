/*
 * x86-64 side of the virtio drivers: where devices are found.
 *   - virtio-mmio: "virtio_mmio.device=" words of the kernel command line
 *     (Firecracker, QEMU microvm with acpi=off, vmmkit);
 *   - virtio-pci: bus 0 through configuration mechanism #1 (0xcf8/0xcfc).
 * BARs the VMM left at 0 are assigned from a fixed window, vmmkit's 32-bit
 * PCI window 0xc8000000-0xe7ffffff, unless "virtio_pci.window=" says
 * otherwise (the ACPI _CRS of the host bridge is not parsed).
 */
#include "bootinfo.h"
#include "io.h"
#include "virtio.h"
#include "virtio_mmio.h"
#include "virtio_pci.h"

#define PCI_CONFIG_ADDRESS	0xcf8
#define PCI_CONFIG_DATA		0xcfc

static void select_reg(u8 bus, u8 dev, u8 fn, u16 offset)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | (u32)bus << 16 | (u32)(dev & 31) << 11 |
				 (u32)(fn & 7) << 8 | (offset & 0xfc));
}

u32 arch_pci_read(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size)
{
	if (offset >= 256)
		return ~0u;
	select_reg(bus, dev, fn, offset);
	switch (size) {
	case 1: return inb(PCI_CONFIG_DATA + (offset & 3));
	case 2: return inw(PCI_CONFIG_DATA + (offset & 2));
	default: return inl(PCI_CONFIG_DATA);
	}
}

void arch_pci_write(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size, u32 value)
{
	if (offset >= 256)
		return;
	select_reg(bus, dev, fn, offset);
	switch (size) {
	case 1: outb(PCI_CONFIG_DATA + (offset & 3), value); break;
	case 2: outw(PCI_CONFIG_DATA + (offset & 2), value); break;
	default: outl(PCI_CONFIG_DATA, value); break;
	}
}

void arch_pci_mem_window(u64 *base, u64 *size)
{
	*base = 0xc8000000;
	*size = 512u << 20;
}

void arch_virtio_discover(void)
{
	virtio_mmio_from_cmdline(boot_info->cmdline);
	virtio_pci_scan(0, boot_info->cmdline);
}
