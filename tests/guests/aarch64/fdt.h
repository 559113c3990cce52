/* What the selftest needs from the flattened device tree the VMM passed in x0. */
#ifndef AARCH64_FDT_H
#define AARCH64_FDT_H

#include "bootinfo.h"
#include "layout.h"

#define FDT_MAX_VIRTIO	32

struct platform {
	u32 fdt_size;
	u32 nr_cpus;
	u64 cpu_mpidr[MAX_CPUS];	/* the "reg" of each cpu node, in order */
	char cpu_enable_method[16];	/* of the first cpu node */
	bool psci;			/* a /psci node ("arm,psci*") */
	bool psci_smc;			/* its method is "smc" (else "hvc") */
	char psci_compatible[32];
	u64 uart, rtc, debug_exit;	/* PL011, PL031, vmmkit,debug-exit: 0 if absent */
	u32 rtc_irq;			/* the PL031's INTID (SPI + 32), 0 if none */
	char stdout_path[64];
	u64 initrd_start, initrd_end;
	bool gic_v3, timer;
	u64 gic_dist, gic_redist;	/* the arm,gic-v3 node's first two reg entries */
	u64 gic_its;			/* an arm,gic-v3-its node's reg, 0 if none */
	u32 timer_virt_intid;		/* the virtual timer's INTID (third timer interrupt), 0 if unknown */
	u64 pci_ecam, pci_ecam_size;	/* the pci-host-ecam-generic node's reg (bus 0 first) */
	u64 pci_mem32, pci_mem32_size;	/* its first 32-bit memory window (ranges), 0 if none */
	u32 nr_virtio;
	u64 virtio_base[FDT_MAX_VIRTIO], virtio_size[FDT_MAX_VIRTIO];
	u32 virtio_irq[FDT_MAX_VIRTIO];
};

extern struct platform plat;

/*
 * Parse the DTB at `dtb` into `plat` and `bi` (command line, memory map).
 * Returns NULL, or why the DTB is unusable.
 */
const char *fdt_parse(u64 dtb, struct bootinfo *bi);

#endif
