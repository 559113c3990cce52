/*
 * test=rng: the first virtio-rng (entropy) device: 64 bytes from its
 * requestq (the device may fill less than asked per request); passes if
 * they are not all equal.
 */
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define RNG_BYTES 64

static void run_rng(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_RNG, 0);
	static u8 *buf;
	u32 got = 0, len;
	unsigned requests = 0;
	const char *err;
	bool differ = false;
	char hex[2 * 16 + 1];

	if (!d) {
		report_fail("rng", "no virtio-rng device");
		return;
	}
	if (!buf)
		buf = dma_alloc(RNG_BYTES, 64);
	if (!buf) {
		report_fail("rng", "out of DMA memory");
		return;
	}
	err = virtio_start(d, 0, 1);
	if (err) {
		report_fail("rng", "%s: %s", d->where, err);
		return;
	}
	memset(buf, 0, RNG_BYTES);
	while (got < RNG_BYTES && requests < 64) {
		struct vbuf b = { buf + got, RNG_BYTES - got, true };

		err = virtq_transfer(&d->vq[0], &b, 1, &len, 5);
		if (err) {
			report_fail("rng", "requestq: %s", err);
			goto out;
		}
		requests++;
		got += len < RNG_BYTES - got ? len : RNG_BYTES - got;
	}
	if (got < RNG_BYTES) {
		report_fail("rng", "only %u bytes in %u requests", got, requests);
		goto out;
	}
	for (unsigned i = 1; i < RNG_BYTES; i++)
		differ |= buf[i] != buf[0];
	for (unsigned i = 0; i < 16; i++)
		snprintf(hex + 2 * i, 3, "%02x", buf[i]);
	info("virtio", "rng: %s %u bytes in %u requests: %s...", d->where, got, requests, hex);
	if (differ)
		report_ok("rng", NULL);
	else
		report_fail("rng", "all %u bytes are 0x%02x", RNG_BYTES, buf[0]);
out:
	virtio_reset(d);
}
SELFTEST(rng, run_rng, "virtio-rng: 64 bytes, not all equal");
