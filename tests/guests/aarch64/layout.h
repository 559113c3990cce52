/* Constants shared by the AArch64 entry code and C. */
#ifndef AARCH64_LAYOUT_H
#define AARCH64_LAYOUT_H

#define MAX_CPUS	16
#define STACK_SIZE	0x4000		/* per CPU, at the top of .stacks */
#define TEXT_OFFSET	0x80000

/* Secondary entry contexts (PSCI CPU_ON x0): cpu index | CTX_* */
#define CTX_START	0x000		/* first start: report in, then CPU_OFF */
#define CTX_WORK	0x100		/* arch_run_on_others: run the work function */

#endif
