/*
 * AArch64 side of the virtio drivers: virtio-mmio devices are the
 * "virtio,mmio" nodes of the device tree (and any "virtio_mmio.device="
 * word of the command line). There is no PCI scan: the device tree's PCI
 * host bridge is not used, so configuration reads answer "no device".
 */
#include "bootinfo.h"
#include "fdt.h"
#include "virtio.h"
#include "virtio_mmio.h"
#include "virtio_pci.h"

u32 arch_pci_read(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size)
{
	(void)bus, (void)dev, (void)fn, (void)offset, (void)size;
	return ~0u;
}

void arch_pci_write(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size, u32 value)
{
	(void)bus, (void)dev, (void)fn, (void)offset, (void)size, (void)value;
}

void arch_pci_mem_window(u64 *base, u64 *size)
{
	*base = 0x10000000;
	*size = 0;
}

void arch_virtio_discover(void)
{
	for (u32 i = 0; i < plat.nr_virtio; i++)
		virtio_mmio_probe(plat.virtio_base[i], plat.virtio_size[i],
				  plat.virtio_irq[i] >= 32 ? plat.virtio_irq[i] - 32 : 0);
	virtio_mmio_from_cmdline(boot_info->cmdline);
}
