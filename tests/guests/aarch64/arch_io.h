/*
 * What device drivers (virtio/) need from the architecture. The identity map
 * (entry.S) makes [0, 1 GiB) Device-nGnRnE memory (ordered, uncached) and RAM
 * Normal write-back memory; devices are DMA-coherent ("dma-coherent" in the
 * device tree), so barriers are all the ordering drivers need.
 */
#ifndef AARCH64_ARCH_IO_H
#define AARCH64_ARCH_IO_H

#include "types.h"

static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)phys(addr); }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)phys(addr); }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)phys(addr); }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)phys(addr) = v; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)phys(addr) = v; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)phys(addr) = v; }

static inline void dma_wmb(void) { __asm__ __volatile__("dmb oshst" ::: "memory"); }
static inline void dma_rmb(void) { __asm__ __volatile__("dmb oshld" ::: "memory"); }
static inline void dma_mb(void) { __asm__ __volatile__("dmb osh" ::: "memory"); }

/* The map is the identity: a pointer is its own physical (DMA) address. */
static inline u64 dma_addr(const void *p) { return (u64)(uintptr_t)p; }

#endif
