/* AArch64 inline helpers used by the common code (see common/arch.h). */
#ifndef AARCH64_ARCH_CPU_H
#define AARCH64_ARCH_CPU_H

#include "types.h"
#include "layout.h"

#define ARCH_NAME "aarch64"

#define sysreg_read(name) ({						\
	u64 __v;							\
	__asm__ __volatile__("mrs %0, " #name : "=r"(__v) :: "memory");	\
	__v;								\
})
#define sysreg_write(name, v) \
	__asm__ __volatile__("msr " #name ", %0" :: "r"((u64)(v)) : "memory")

/* TPIDR_EL1 holds the CPU's index (0 = boot CPU), set by entry.S. */
static inline unsigned arch_cpu_index(void)
{
	return (unsigned)sysreg_read(tpidr_el1);
}

static inline void arch_cpu_relax(void)
{
	__asm__ __volatile__("yield" ::: "memory");
}

static inline void arch_cpu_halt(void)
{
	__asm__ __volatile__("msr daifset, #0xf; wfi" ::: "memory");
}

/* The generic timer's virtual count (frequency: CNTFRQ_EL0). */
static inline u64 arch_cycles(void)
{
	__asm__ __volatile__("isb" ::: "memory");
	return sysreg_read(cntvct_el0);
}

#endif
