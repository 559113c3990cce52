#ifndef X86_64_SMP_H
#define X86_64_SMP_H

#include "bootinfo.h"

/* Start every CPU in ids[] but this one, report "ok smp" or FAIL. */
void smp_boot(const struct bootinfo *bi, const u32 *ids, unsigned n);

#endif
