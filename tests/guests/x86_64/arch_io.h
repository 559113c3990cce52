/*
 * What device drivers (virtio/) need from the architecture: MMIO accessors,
 * DMA barriers and addresses. Every architecture provides an arch_io.h
 * with these names (see common/arch.h).
 */
#ifndef X86_64_ARCH_IO_H
#define X86_64_ARCH_IO_H

#include "io.h"		/* mmio_read{8,16,32}, mmio_write{8,16,32} */

/*
 * x86 keeps loads with loads and stores with stores in order (and MMIO is
 * uncached), so only store -> load needs a fence. A locked add is that
 * fence without SSE2's mfence (see the instruction check in build.mk).
 */
static inline void dma_wmb(void) { barrier(); }
static inline void dma_rmb(void) { barrier(); }
static inline void dma_mb(void)
{
	__asm__ __volatile__("lock orl $0, (%%rsp)" ::: "memory", "cc");
}

/* Guest memory is identity-mapped: a pointer is its own DMA address. */
static inline u64 dma_addr(const void *p) { return (u64)(uintptr_t)p; }

#endif
