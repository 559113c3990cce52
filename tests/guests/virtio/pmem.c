/*
 * test=pmem: the first virtio-pmem device (virtio 1.2, 5.19). Reads the
 * region from the configuration space (start, size: both 2 MiB multiples);
 * where this guest can map the region (x86-64: arch_map_mmio, uncached 2 MiB
 * pages; not the AArch64 guest, whose identity map ends at 512 GiB, below
 * vmmkit's 64-bit device window) it prints the first 8 bytes (the host's)
 * and writes "GUESTPM!" at offset 8. Then a FLUSH must answer ret 0, and a
 * request of an unknown type ret 1 (EIO).
 */
#include "arch.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define VIRTIO_ID_PMEM		27
#define PMEM_REQ_FLUSH		0
#define PMEM_ALIGN		(2ull << 20)

static const char *pmem_request(struct virtio_dev *d, u32 *io, u32 type, u32 *ret)
{
	struct vbuf b[2] = { { &io[0], 4, false }, { &io[1], 4, true } };
	const char *err;
	u32 len;

	io[0] = type;
	io[1] = 0xffffffff;
	err = virtq_transfer(&d->vq[0], b, 2, &len, 5);
	if (err)
		return err;
	if (len != 4)
		return "the device wrote a response that is not 4 bytes";
	*ret = io[1];
	return NULL;
}

static void run_pmem(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_PMEM, 0);
	static u32 *io;
	const char *err;
	u64 start, size;
	u32 ret;
	char first[9];

	if (!d) {
		report_fail("pmem", "no virtio-pmem device");
		return;
	}
	if (!io)
		io = dma_alloc(64, 64);
	err = virtio_start(d, 0, 1);
	if (err) {
		report_fail("pmem", "%s: %s", d->where, err);
		return;
	}
	start = virtio_config64(d, 0);
	size = virtio_config64(d, 8);
	info("virtio", "pmem: %s region [0x%llx-0x%llx)", d->where, (unsigned long long)start,
	     (unsigned long long)(start + size));
	if (!size || start % PMEM_ALIGN || size % PMEM_ALIGN) {
		report_fail("pmem", "region 0x%llx+0x%llx is not in 2 MiB units", (unsigned long long)start,
			    (unsigned long long)size);
		goto out;
	}
	if (arch_map_mmio(start, size)) {
		volatile u8 *region = phys(start);

		for (unsigned i = 0; i < 8; i++)
			first[i] = (char)region[i] >= ' ' && (char)region[i] < 127 ? (char)region[i] : '.';
		first[8] = 0;
		info("pmem", "first bytes: %s", first);
		for (unsigned i = 0; i < 8; i++)
			region[8 + i] = (u8)"GUESTPM!"[i];
	} else {
		info("pmem", "the region is beyond this guest's map: no data access");
	}
	err = pmem_request(d, io, PMEM_REQ_FLUSH, &ret);
	if (err || ret != 0) {
		report_fail("pmem", "flush: %s (ret %u)", err ? err : "refused", ret);
		goto out;
	}
	err = pmem_request(d, io, 7, &ret);
	if (err || ret != 1) {
		report_fail("pmem", "unknown request type: %s (ret %u, expected 1)", err ? err : "answered", ret);
		goto out;
	}
	report_ok("pmem", "%llu MiB, flush ok", (unsigned long long)(size >> 20));
out:
	virtio_reset(d);
}
SELFTEST(pmem, run_pmem, "virtio-pmem: the region, FLUSH, an unknown request");
