/* A test-and-set spinlock that remembers its owner (for the exception path). */
#ifndef COMMON_SPINLOCK_H
#define COMMON_SPINLOCK_H

#include "arch.h"

struct spinlock {
	u32 owner;	/* 0: free, else CPU index + 1 */
};

static inline void spin_lock(struct spinlock *l)
{
	u32 me = arch_cpu_index() + 1;

	for (;;) {
		u32 expected = 0;

		if (__atomic_compare_exchange_n(&l->owner, &expected, me, false,
						__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			return;
		while (READ_ONCE(l->owner))
			arch_cpu_relax();
	}
}

static inline void spin_unlock(struct spinlock *l)
{
	__atomic_store_n(&l->owner, 0, __ATOMIC_RELEASE);
}

static inline void spin_unlock_if_owner(struct spinlock *l)
{
	if (READ_ONCE(l->owner) == arch_cpu_index() + 1)
		spin_unlock(l);
}

#endif
