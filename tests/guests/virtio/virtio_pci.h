/* virtio-pci modern transport (virtio 1.2, 4.1) and the PCI bus scan. */
#ifndef VIRTIO_VIRTIO_PCI_H
#define VIRTIO_VIRTIO_PCI_H

#include "types.h"

/* From the architecture: configuration space of PCI segment 0 (size 1, 2, 4). */
u32 arch_pci_read(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size);
void arch_pci_write(u8 bus, u8 dev, u8 fn, u16 offset, unsigned size, u32 value);
/*
 * From the architecture: the 32-bit memory window BARs are assigned from
 * when the VMM left them at 0 ([*base, *base + *size)); the command line
 * "virtio_pci.window=<size>@<base>" overrides it.
 */
void arch_pci_mem_window(u64 *base, u64 *size);

/*
 * Find the virtio functions of one bus (vendor 0x1af4, device 0x1040 +
 * type, or transitional 0x1000-0x103f with the type as subsystem id) and
 * register those with the modern capabilities. BARs that read as 0 are
 * assigned from the window ("virtio_pci.assign=all": every BAR of a
 * virtio function is, to test that path under a firmware that assigns).
 */
void virtio_pci_scan(u8 bus, const char *cmdline);

/*
 * Any device, not only virtio (bus 0, enumerated once, with the same BAR
 * window): the index-th function with this vendor and device id.
 */
bool pci_find(u16 vendor, u16 device, unsigned index, const char *cmdline, u8 *bus, u8 *dev,
	      u8 *fn);
/*
 * A memory BAR's address, assigned from the window when it reads 0, and
 * its size; 0 (after a FAIL line for `test`) if it is an I/O BAR or does
 * not fit.
 */
u64 pci_memory_bar(const char *test, u8 bus, u8 dev, u8 fn, unsigned bar, u64 *size);

#endif
