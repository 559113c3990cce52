/*
 * What device drivers (virtio/) need from the architecture. The identity map
 * (entry.S) makes [0, 1 GiB) Device-nGnRnE memory (ordered, uncached) and RAM
 * Normal write-back memory; devices are DMA-coherent ("dma-coherent" in the
 * device tree), so barriers are all the ordering drivers need.
 */
#ifndef AARCH64_ARCH_IO_H
#define AARCH64_ARCH_IO_H

#include "types.h"

/*
 * MMIO is one plain load or store with a base register and no writeback, as Linux's readl() and
 * writel() do: only such an access has a valid instruction syndrome (ESR_EL2.ISV), without which
 * KVM cannot emulate it (KVM_RUN fails with ENOSYS). A C volatile access leaves the addressing
 * mode to the compiler.
 */
static inline u8 mmio_read8(u64 addr)
{
	u8 v;
	__asm__ __volatile__("ldrb %w0, [%1]" : "=r"(v) : "r"(phys(addr)) : "memory");
	return v;
}
static inline u16 mmio_read16(u64 addr)
{
	u16 v;
	__asm__ __volatile__("ldrh %w0, [%1]" : "=r"(v) : "r"(phys(addr)) : "memory");
	return v;
}
static inline u32 mmio_read32(u64 addr)
{
	u32 v;
	__asm__ __volatile__("ldr %w0, [%1]" : "=r"(v) : "r"(phys(addr)) : "memory");
	return v;
}
static inline void mmio_write8(u64 addr, u8 v)
{
	__asm__ __volatile__("strb %w0, [%1]" :: "rZ"(v), "r"(phys(addr)) : "memory");
}
static inline void mmio_write16(u64 addr, u16 v)
{
	__asm__ __volatile__("strh %w0, [%1]" :: "rZ"(v), "r"(phys(addr)) : "memory");
}
static inline void mmio_write32(u64 addr, u32 v)
{
	__asm__ __volatile__("str %w0, [%1]" :: "rZ"(v), "r"(phys(addr)) : "memory");
}

static inline void dma_wmb(void) { __asm__ __volatile__("dmb oshst" ::: "memory"); }
static inline void dma_rmb(void) { __asm__ __volatile__("dmb oshld" ::: "memory"); }
static inline void dma_mb(void) { __asm__ __volatile__("dmb osh" ::: "memory"); }

/* The map is the identity: a pointer is its own physical (DMA) address. */
static inline u64 dma_addr(const void *p) { return (u64)(uintptr_t)p; }

#endif
