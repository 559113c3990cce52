/*
 * test=blkbench: sequential throughput and latency of the first virtio-blk
 * device, for bench/blk.py. Four phases, in this order: write and read at
 * queue depth 1, then write and read at queue depth blkbench.qd (default 4,
 * at most 5; 0 or 1 leaves them out). Each moves blkbench.total bytes (default 32M) in
 * requests of blkbench.size bytes (default 64K, a multiple of 512), at
 * sectors 0, size/512, ... wrapping at the end of the disk, after an
 * unreported warm-up (4 MiB written and read at depth 1). Each phase ends
 * with one line
 *
 *	selftest: info blkbench: <read|write> <MiB/s> MiB/s <latency> us (qd <n>, <k> KiB x <count>)
 *
 * VIRTIO_BLK_F_FLUSH is negotiated unless blkbench.flush=0 (then the device
 * must complete only stable writes: write-through).
 *
 * MiB/s = bytes / time of the whole phase; latency = mean time from making a
 * request available to seeing it in the used ring. Then "ok blkbench".
 *
 * Time is the cycle counter (arch_cycles, the TSC), its rate measured against
 * the clock behind timeouts (arch_clock_seconds: the CMOS RTC, which no VMM
 * here slows down) over one second at the start.
 *
 * Guest ring-0 code may be emulated at ~1 us per instruction (pvm-host.md),
 * so the per-request work is kept small: each in-flight slot owns three
 * descriptors (header, data, status) written once per phase; a request is
 * a header store, an available-ring entry, the index and a notification
 * (skipped while the device sets VIRTQ_USED_F_NO_NOTIFY); completions are
 * found by polling the used index. The data buffers are RAM past the
 * image (found in the memory map), so any size up to 1 MiB fits. Data
 * written is whatever that RAM holds, except its first 8 bytes: the
 * sector's stamp (sector ^ STAMP), which every read checks, so a read
 * served from the wrong place or not at all is caught.
 *
 * The device may complete requests in any order (virtio 1.2, 2.7.14): a
 * completed request's slot is the one refilled next, and a used id that is
 * not a request in flight (completed twice, or never made available) fails
 * the phase, as does a status byte the device did not write.
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define T_IN		0
#define T_OUT		1
#define SECTOR		512
#define MAX_QD		5		/* 3 descriptors each, in 16 */
#define MAX_SIZE	(1u << 20)
#define WARMUP		(4u << 20)	/* bytes written and read before measuring */
#define VIRTQ_USED_F_NO_NOTIFY 1
#define STAMP		0x5354414d50000000ull	/* "STAMP" */

struct slot {
	u32 type, reserved;
	u64 sector;
	u8 status;
	u8 pad[7];
};

static struct slot *slots;		/* DMA memory, MAX_QD of them */

static u64 param(const char *key, u64 dflt)
{
	size_t len;
	const char *v = cmdline_value(boot_info->cmdline, key, 0, &len);
	u64 n;

	if (v && cmdline_parse_u64(&v, v + len, &n, true))
		return n;
	return dflt;
}

/* bytes RAM past the image, 2 MiB aligned, or 0. */
static u64 buffer_ram(u64 bytes)
{
	u64 at = ALIGN_UP((u64)(uintptr_t)_end, 1ull << 21) + (1ull << 21);

	return memmap_is_ram(boot_info, at, at + bytes) && at + bytes <= 1ull << 32 ? at : 0;
}

/* Cycles per second: cycles between two changes of the clock's seconds. */
static u64 cycles_per_second(void)
{
	int s0 = arch_clock_seconds(), s;
	u64 t0, t1, start = arch_cycles();

	if (s0 < 0)
		return 0;
	/* Bounded by 2^36 cycles (>= 10 s below 6.8 GHz) per edge. */
	while ((s = arch_clock_seconds()) == s0)
		if (arch_cycles() - start > 1ull << 36)
			return 0;
	t0 = arch_cycles();
	while (arch_clock_seconds() == s)
		if (arch_cycles() - t0 > 1ull << 36)
			return 0;
	t1 = arch_cycles();
	return t1 - t0;
}

/* "12.3" from value * 10. */
static void decimal(char *buf, size_t size, u64 tenths)
{
	snprintf(buf, size, "%llu.%llu", (unsigned long long)(tenths / 10),
		 (unsigned long long)(tenths % 10));
}

struct phase {
	bool write;
	unsigned qd;
	u32 size;
	u64 requests, span;	/* span: sectors used, a multiple of size / 512 */
};

/* One phase; NULL or an error. Prints its line unless quiet (warm-up). */
static const char *run_phase(struct virtio_dev *d, u64 buffers, const struct phase *p, u64 hz,
			     bool quiet)
{
	static char msg[96];
	struct virtq *q = &d->vq[0];
	u16 size = q->size, avail = q->avail_idx, used = q->last_used;
	u64 step = p->size / SECTOR, sector = 0, submitted = 0, done = 0;
	u64 start[MAX_QD], lat = 0, t_begin, t_end, wait, limit = 10 * hz;
	unsigned free_slot[MAX_QD], nfree = 0;
	bool busy[MAX_QD] = { false };
	char mibs[24], us[24];

	for (unsigned s = p->qd; s-- > 0;)
		free_slot[nfree++] = s;	/* slot 0 first */

	for (unsigned s = 0; s < p->qd; s++) {
		struct virtq_desc *desc = &q->desc[3 * s];

		slots[s].type = p->write ? T_OUT : T_IN;
		slots[s].reserved = 0;
		desc[0] = (struct virtq_desc){ dma_addr(&slots[s]), 16, VIRTQ_DESC_F_NEXT, 3 * s + 1 };
		desc[1] = (struct virtq_desc){ buffers + (u64)s * p->size, p->size,
			VIRTQ_DESC_F_NEXT | (p->write ? 0 : VIRTQ_DESC_F_WRITE), 3 * s + 2 };
		desc[2] = (struct virtq_desc){ dma_addr(&slots[s].status), 1, VIRTQ_DESC_F_WRITE, 0 };
	}
	dma_wmb();

	t_begin = arch_cycles();
	while (done < p->requests) {
		/* Fill every free slot, then notify once. */
		bool added = false;

		while (nfree && submitted < p->requests) {
			unsigned s = free_slot[--nfree];

			busy[s] = true;
			slots[s].sector = sector;
			slots[s].status = 0xff;
			*(volatile u64 *)(uintptr_t)(buffers + (u64)s * p->size) = p->write ? sector ^ STAMP : 0;
			sector += step;
			if (sector >= p->span)
				sector = 0;
			q->avail->ring[avail % size] = 3 * s;
			start[s] = arch_cycles();
			dma_wmb();
			WRITE_ONCE(q->avail->idx, ++avail);
			submitted++;
			added = true;
		}
		if (added) {
			dma_mb();
			if (!(READ_ONCE(q->used->flags) & VIRTQ_USED_F_NO_NOTIFY))
				d->transport->notify(d, q);
		}
		/* Wait for at least one completion. */
		wait = arch_cycles();
		for (u32 spins = 0; READ_ONCE(q->used->idx) == used; spins++)
			if (!(spins & 0xfff) && arch_cycles() - wait > limit) {
				snprintf(msg, sizeof(msg), "request %llu: nothing used after %llu s",
					 (unsigned long long)done, (unsigned long long)(limit / hz));
				return msg;
			}
		dma_rmb();
		while (READ_ONCE(q->used->idx) != used) {
			u32 id = q->used->ring[used % size].id;
			unsigned s = id / 3;
			u64 now = arch_cycles();

			used++;
			if (id % 3 || s >= p->qd || !busy[s] || READ_ONCE(slots[s].status)) {
				snprintf(msg, sizeof(msg), "request at sector %llu: id %u status 0x%x%s",
					 (unsigned long long)slots[s < p->qd ? s : 0].sector, id,
					 s < p->qd ? slots[s].status : 0xff,
					 s < p->qd && !busy[s] ? " (not in flight)" : "");
				return msg;
			}
			if (!p->write) {
				u64 stamp = *(volatile u64 *)(uintptr_t)(buffers + (u64)s * p->size);

				if (stamp != (slots[s].sector ^ STAMP)) {
					snprintf(msg, sizeof(msg), "read of sector %llu: stamp %#llx",
						 (unsigned long long)slots[s].sector,
						 (unsigned long long)stamp);
					return msg;
				}
			}
			busy[s] = false;
			free_slot[nfree++] = s;
			lat += now - start[s];
			done++;
		}
	}
	t_end = arch_cycles();
	q->avail_idx = avail;
	q->last_used = used;
	if (quiet)
		return NULL;

	/* MiB/s * 10 = bytes * 10 / 2^20 / (cycles / hz); us * 10 = cycles * 10^7 / hz / n */
	decimal(mibs, sizeof(mibs), p->requests * p->size * 10 / 1024 * hz / (t_end - t_begin) / 1024);
	decimal(us, sizeof(us), lat / p->requests * 10000000 / hz);
	info("blkbench", "%s %s MiB/s %s us (qd %u, %u KiB x %llu)", p->write ? "write" : "read",
	     mibs, us, p->qd, p->size / 1024, (unsigned long long)p->requests);
	return NULL;
}

static void run_blkbench(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, 0);
	u64 size = param("blkbench.size", 64 * 1024), total = param("blkbench.total", 32 << 20);
	u64 qd = param("blkbench.qd", 4), flush = param("blkbench.flush", 1), cap, hz, buffers;
	struct phase p;
	const char *err;

	if (!d) {
		report_fail("blkbench", "no virtio-blk device");
		return;
	}
	if (!size || size % SECTOR || size > MAX_SIZE || total < size) {
		report_fail("blkbench", "blkbench.size %llu / total %llu: want a multiple of 512 up to "
			    "1 MiB, total at least one request", (unsigned long long)size,
			    (unsigned long long)total);
		return;
	}
	if (!slots)
		slots = dma_alloc(MAX_QD * sizeof(*slots), 64);
	buffers = buffer_ram(MAX_QD * size);
	if (!slots || !buffers) {
		report_fail("blkbench", "no memory for %u buffers of %llu bytes", MAX_QD,
			    (unsigned long long)size);
		return;
	}
	hz = cycles_per_second();
	if (!hz) {
		report_skip("blkbench", "no clock to measure the cycle counter against");
		return;
	}
	info("blkbench", "cycle counter %llu kHz (measured against the clock)",
	     (unsigned long long)hz / 1000);

	/*
	 * FLUSH negotiated, as Linux does: without it the device must make every
	 * write stable before completing it (virtio 1.2, 5.2.6.2; QEMU then
	 * fdatasyncs per write), which is not what we want to measure by default;
	 * blkbench.flush=0 asks for that write-through mode.
	 */
	err = virtio_start(d, flush ? VIRTIO_BLK_F_FLUSH : 0, 1);
	if (err) {
		report_fail("blkbench", "%s: %s", d->where, err);
		return;
	}
	cap = virtio_config64(d, 0);
	if (qd < 1)
		qd = 1;
	if (qd > d->vq[0].size / 3)
		qd = d->vq[0].size / 3;
	if (qd > MAX_QD)
		qd = MAX_QD;
	p.size = size;
	p.requests = total / size;
	p.span = cap / (size / SECTOR) * (size / SECTOR);
	if (!p.span) {
		report_fail("blkbench", "the disk (%llu sectors) is smaller than one request",
			    (unsigned long long)cap);
		goto out;
	}
	info("blkbench", "%s, %llu sectors, %llu MiB per phase, %s", d->where,
	     (unsigned long long)cap, (unsigned long long)(p.requests * size >> 20),
	     d->features & VIRTIO_BLK_F_FLUSH ? "FLUSH negotiated" : "no FLUSH (write-through)");
	/* Warm-up, not reported: the first requests pay for start-up work (threads, caches). */
	p.qd = 1;
	p.requests = (WARMUP < total ? WARMUP : total) / size;
	for (int w = 1; w >= 0 && p.requests; w--) {
		p.write = w;
		err = run_phase(d, buffers, &p, hz, true);
		if (err) {
			report_fail("blkbench", "warm-up %s: %s", w ? "write" : "read", err);
			goto out;
		}
	}
	p.requests = total / size;
	for (unsigned depth = 1; depth <= qd; depth = depth == 1 && qd > 1 ? qd : qd + 1) {
		for (int w = 1; w >= 0; w--) {
			p.write = w;
			p.qd = depth;
			err = run_phase(d, buffers, &p, hz, false);
			if (err) {
				report_fail("blkbench", "%s qd %u: %s", w ? "write" : "read", depth, err);
				goto out;
			}
		}
	}
	report_ok("blkbench", NULL);
out:
	virtio_reset(d);
}
SELFTEST(blkbench, run_blkbench, "virtio-blk sequential read/write throughput and latency");
