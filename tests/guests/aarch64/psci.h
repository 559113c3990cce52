/* PSCI through the conduit the device tree names (hvc or smc). */
#ifndef AARCH64_PSCI_H
#define AARCH64_PSCI_H

#include "types.h"

#define PSCI_VERSION		0x84000000u
#define PSCI_CPU_OFF		0x84000002u
#define PSCI_CPU_ON		0xc4000003u
#define PSCI_AFFINITY_INFO	0xc4000004u
#define PSCI_SYSTEM_OFF		0x84000008u
#define PSCI_SYSTEM_RESET	0x84000009u
#define PSCI_FEATURES		0x8400000au

#define PSCI_SUCCESS		0
#define PSCI_NOT_SUPPORTED	(-1)
#define PSCI_ALREADY_ON		(-4)
#define AFFINITY_ON		0
#define AFFINITY_OFF		1

long psci_call(u32 fn, u64 a1, u64 a2, u64 a3);

/* Report the PSCI version and features ("ok psci" or FAIL). */
void psci_check(void);

/* Start every CPU of the device tree but this one; "ok smp" or FAIL. */
void smp_boot(void);

#endif
