/* virtio-mmio v2 transport and its discovery from the kernel command line. */
#ifndef VIRTIO_VIRTIO_MMIO_H
#define VIRTIO_VIRTIO_MMIO_H

#include "types.h"

/* Check the device at [base, base + size) and register it if usable. */
void virtio_mmio_probe(u64 base, u64 size, u32 irq);

/* Probe every "virtio_mmio.device=<size>@<base>:<irq>[:<id>]" word. */
void virtio_mmio_from_cmdline(const char *cmdline);

#endif
