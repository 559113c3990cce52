/* x86-64 inline helpers used by the common code (see common/arch.h). */
#ifndef X86_64_ARCH_CPU_H
#define X86_64_ARCH_CPU_H

#include "types.h"
#include "layout.h"

#define ARCH_NAME "x86_64"

/* Per-CPU data at the base of each CPU's STACK_SIZE-aligned stack. */
struct percpu {
	u32 index;		/* 0 = BSP, then in start-up order */
	u32 apic_id;
};

static inline struct percpu *this_cpu(void)
{
	uintptr_t sp;

	__asm__("mov %%rsp, %0" : "=r"(sp));
	return (struct percpu *)(sp & ~(uintptr_t)(STACK_SIZE - 1));
}

static inline unsigned arch_cpu_index(void)
{
	return this_cpu()->index;
}

static inline void arch_cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

static inline void arch_cpu_halt(void)
{
	__asm__ __volatile__("cli; hlt" ::: "memory");
}

static inline u64 arch_cycles(void)
{
	u32 lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return lo | (u64)hi << 32;
}

#endif
