/* The MSHV vCPU run loop in C: MSHV_RUN_VP until an intercept Python must see, serving port
 * writes to "sinks" (a port whose bytes go to an fd) without leaving C. The ioctl is called
 * through a function pointer: the host's ioctl(2), or a callback into a kernel implemented in
 * Python (the simulated /dev/mshv, a contract test) -- the backend's one seam. */
#ifndef VMMKIT_MSHV_RUNLOOP_H
#define VMMKIT_MSHV_RUNLOOP_H

#include <stdint.h>

/* 0 on success, -errno on failure. */
typedef int (*vmk_mshv_ioctl_fn)(int fd, unsigned long request, uintptr_t arg);

#define VMK_MSHV_MAX_SINKS 16

struct vmk_mshv_sink {
	uint16_t port;
	int fd;
	uint8_t read_value;
	int used;
};

struct vmk_mshv_sinks {
	struct vmk_mshv_sink sink[VMK_MSHV_MAX_SINKS];
};

struct vmk_mshv_vp {
	int fd;
	vmk_mshv_ioctl_fn ioctl;
	struct vmk_mshv_sinks *sinks;	/* the VM's, shared by its VPs */
	uint8_t *register_page;		/* struct hv_vp_register_page, or NULL */
	volatile int kicked;
	uint64_t runs, sink_writes, sink_reads, returned;
	uint8_t msg[256];
};

int vmk_mshv_host_ioctl(int fd, unsigned long request, uintptr_t arg);
int vmk_mshv_run(struct vmk_mshv_vp *vp);

#endif
