/*
 * What each architecture (x86_64/, later aarch64/) provides to the common
 * code. The arch directory is on the include path, so "arch_cpu.h" is the
 * architecture's inline helpers: ARCH_NAME, arch_cpu_index(),
 * arch_cpu_relax(), arch_cycles(). Device drivers also include "arch_io.h":
 * mmio_read{8,16,32}() / mmio_write{8,16,32}() (one single-register access
 * each, safe for a VMM to emulate), dma_mb() / dma_rmb() / dma_wmb() and
 * dma_addr(pointer) (the address a device uses for guest memory).
 */
#ifndef COMMON_ARCH_H
#define COMMON_ARCH_H

#include "types.h"
#include "arch_cpu.h"

struct bootinfo;

/* Console: one byte out (polled). */
void arch_putc(char c);

/* Wall clock seconds field (0-59), or -1 when there is no clock. */
int arch_clock_seconds(void);

/* The architecture's default checks (firmware tables, CPUs, SMP, clock). */
void arch_checks(const struct bootinfo *bi);

/*
 * Make every other online CPU call fn() once (it may never return).
 * Returns the number of CPUs asked.
 */
unsigned arch_run_on_others(void (*fn)(void));

/*
 * Make the device MMIO range [addr, addr + size) accessible at the virtual
 * address addr (identity, uncached). False if it cannot be mapped.
 */
bool arch_map_mmio(u64 addr, u64 size);

/* Report status to the VMM, power off; never returns. */
__noreturn void arch_exit(int status);

/* Common code: the whole run, called once by the arch start-up code. */
__noreturn void selftest_main(const struct bootinfo *bi);

/* Linker symbols: the loaded image spans [__image_start, _end). */
extern char __image_start[], _end[];

#endif
