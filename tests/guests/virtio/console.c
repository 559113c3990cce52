/*
 * test=console: the first virtio-console device, port 0 only (no
 * MULTIPORT): writes "vmmkit virtio-console says hello\n" to its
 * transmitq (queue 1) and passes once the device has used the buffer.
 * The harness checks the console backend received the line.
 */
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define CONSOLE_LINE "vmmkit virtio-console says hello\n"

static void run_console(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_CONSOLE, 0);
	static char *buf;
	struct vbuf b;
	u32 len = sizeof(CONSOLE_LINE) - 1;
	const char *err;

	if (!d) {
		report_fail("console", "no virtio-console device");
		return;
	}
	if (!buf)
		buf = dma_alloc(64, 64);
	if (!buf) {
		report_fail("console", "out of DMA memory");
		return;
	}
	/* Both queues of port 0: receiveq (0, left empty) and transmitq (1). */
	err = virtio_start(d, 0, 2);
	if (err) {
		report_fail("console", "%s: %s", d->where, err);
		return;
	}
	memcpy(buf, CONSOLE_LINE, len);
	b = (struct vbuf){ buf, len, false };
	err = virtq_transfer(&d->vq[1], &b, 1, NULL, 5);
	if (err)
		report_fail("console", "transmitq: %s", err);
	else
		report_ok("console", NULL);
	virtio_reset(d);
}
SELFTEST(console, run_console, "virtio-console: one line to port 0's transmitq");
