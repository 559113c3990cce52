#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "mshv_abi.h"
#include "mshv_runloop.h"

int vmk_mshv_host_ioctl(int fd, unsigned long request, uintptr_t arg)
{
	int ret = ioctl(fd, request, (void *)arg);

	return ret < 0 ? -errno : ret;
}

static struct vmk_mshv_sink *find_sink(struct vmk_mshv_vp *vp, uint16_t port)
{
	int i;

	if (!vp->sinks)
		return NULL;
	for (i = 0; i < VMK_MSHV_MAX_SINKS; i++)
		if (vp->sinks->sink[i].used && vp->sinks->sink[i].port == port)
			return &vp->sinks->sink[i];
	return NULL;
}

/* A port intercept on a sink, completed here through the register page (valid after an
 * intercept): 1 if done, 0 if Python must handle it (no valid page, string I/O, odd size). */
static int serve_sink(struct vmk_mshv_vp *vp)
{
	const struct hv_message *msg = (const struct hv_message *)vp->msg;
	const struct hv_x64_io_port_intercept_message *io =
		(const struct hv_x64_io_port_intercept_message *)msg->payload;
	struct hv_vp_register_page *page = (struct hv_vp_register_page *)vp->register_page;
	struct vmk_mshv_sink *sink;
	unsigned size = io->access_info & 7;
	unsigned length = io->header.instruction_length_cr8 & 0xf;
	uint8_t bytes[4];

	if (!page || !page->isvalid || (io->access_info & 0x18) || (size != 1 && size != 2 && size != 4) ||
	    !length)
		return 0;
	sink = find_sink(vp, io->port_number);
	if (!sink)
		return 0;
	if (io->header.intercept_access_type == 1) {	/* HV_INTERCEPT_ACCESS_WRITE */
		memcpy(bytes, &io->rax, size);
		if (write(sink->fd, bytes, size) < 0 && errno != EAGAIN)
			return 0;
		vp->sink_writes++;
	} else {
		uint64_t mask = size == 4 ? 0xffffffffull : (1ull << (8 * size)) - 1;
		uint64_t value = 0;

		memset(&value, sink->read_value, size);
		page->gp_registers[0] = size == 4 ? (value & mask) : ((io->rax & ~mask) | (value & mask));
		page->dirty |= 1u << HV_X64_REGISTER_CLASS_GENERAL;
		vp->sink_reads++;
	}
	page->rip = io->header.rip + length;
	page->dirty |= 1u << HV_X64_REGISTER_CLASS_IP;
	return 1;
}

/* 0: vp->msg holds an intercept for Python; -errno: the ioctl failed (-EINTR: a kick). */
int vmk_mshv_run(struct vmk_mshv_vp *vp)
{
	for (;;) {
		const struct hv_message *msg = (const struct hv_message *)vp->msg;
		int ret;

		if (vp->kicked)
			return -EINTR;
		ret = vp->ioctl(vp->fd, MSHV_RUN_VP, (uintptr_t)vp->msg);
		vp->runs++;
		if (ret < 0)
			return ret;
		if (msg->header.message_type == HVMSG_X64_IO_PORT_INTERCEPT && serve_sink(vp))
			continue;
		vp->returned++;
		return 0;
	}
}
