/*
 * AArch64 side of the virtio drivers: virtio-mmio devices are the
 * "virtio,mmio" nodes of the device tree (and any "virtio_mmio.device="
 * word of the command line); PCI is the device tree's
 * "pci-host-ecam-generic" bridge, bus 0 through ECAM (PCIe 6.0, 7.2.2:
 * bus << 20 | device << 15 | function << 12 | register), its BARs assigned
 * (when the VMM left them at 0) from the bridge's first 32-bit memory
 * window in "ranges". Both must lie in the identity map's Device-memory
 * gigabyte (entry.S): QEMU virt puts its ECAM there with highmem=off.
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "fdt.h"
#include "virtio.h"
#include "virtio_mmio.h"
#include "virtio_pci.h"

static bool ecam_ok(void)
{
	static int ok = -1;

	if (ok < 0)
		ok = plat.pci_ecam && plat.pci_ecam_size >= (1u << 20) &&
		     arch_map_mmio(plat.pci_ecam, 1u << 20);
	return ok;
}

/* Bus 0 only (the ECAM's first megabyte). */
static u64 ecam_addr(u8 bus, u8 dev, u8 fn, u16 offset)
{
	return plat.pci_ecam + ((u64)bus << 20 | (u64)(dev & 31) << 15 | (u64)(fn & 7) << 12 |
				(offset & 0xfff));
}

u32 arch_pci_read(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size)
{
	u64 a;

	if (bus || !ecam_ok() || offset >= 4096 || offset & (size - 1))
		return ~0u;
	a = ecam_addr(bus, dev, fn, offset);
	switch (size) {
	case 1: return mmio_read8(a);
	case 2: return mmio_read16(a);
	default: return mmio_read32(a);
	}
}

void arch_pci_write(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size, u32 value)
{
	u64 a;

	if (bus || !ecam_ok() || offset >= 4096 || offset & (size - 1))
		return;
	a = ecam_addr(bus, dev, fn, offset);
	switch (size) {
	case 1: mmio_write8(a, value); break;
	case 2: mmio_write16(a, value); break;
	default: mmio_write32(a, value); break;
	}
}

void arch_pci_mem_window(u64 *base, u64 *size)
{
	*base = plat.pci_mem32 ? plat.pci_mem32 : 0x10000000;
	*size = plat.pci_mem32_size;
}

void arch_virtio_discover(void)
{
	for (u32 i = 0; i < plat.nr_virtio; i++)
		virtio_mmio_probe(plat.virtio_base[i], plat.virtio_size[i],
				  plat.virtio_irq[i] >= 32 ? plat.virtio_irq[i] - 32 : 0);
	virtio_mmio_from_cmdline(boot_info->cmdline);
	if (ecam_ok())
		virtio_pci_scan(0, boot_info->cmdline);
}
