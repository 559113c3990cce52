/* The GICv3 set-up of test=irq (gic.c), shared with the ITS MSIs of msi.c. */
#ifndef AARCH64_GIC_H
#define AARCH64_GIC_H

#include "types.h"

/*
 * Distributor on with affinity routing, this CPU's redistributor awake (*rd: its RD_base), the
 * system-register CPU interface on (priority mask 0xf0, group 1). NULL, or why not.
 */
const char *gic_init(u64 *rd);
/* Called with the INTID of an LPI (>= 8192) from the IRQ vector, before its EOI. */
extern void (*gic_lpi_handler)(u32 intid);

#endif
