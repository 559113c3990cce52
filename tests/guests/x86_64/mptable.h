#ifndef X86_64_MPTABLE_H
#define X86_64_MPTABLE_H

#include "types.h"

/*
 * The Intel MultiProcessor table, for VMMs without ACPI: store up to max
 * enabled processor APIC ids; returns how many there are (0: no table).
 */
unsigned mptable_cpus(u32 *ids, unsigned max);

#endif
