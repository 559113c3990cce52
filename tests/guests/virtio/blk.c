/*
 * test=blk: the first virtio-blk device. Reads the capacity and the serial
 * (GET_ID), writes a pattern to three runs of 4 sectors (the start, the
 * middle, the end of the disk), FLUSHes, reads them back and compares,
 * then checks that a read at sector <capacity> fails with IOERR.
 *
 * The pattern (README.md; tests/integration/qemu_peer.py recomputes it):
 * sector n is 128 little-endian 32-bit words w[0..127],
 *	w[0] = 0x6b6d6d76 ("vmmk")  w[1] = n & 0xffffffff  w[2] = n >> 32
 *	w[3] = seed                 w[i] = (n * 0x9e3779b1 + i * 0x85ebca77) ^ seed, i >= 4
 * (mod 2^32), seed = 0x5eed0001 or "blk.seed=<n>" from the command line.
 */
#include "arch_io.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define VIRTIO_BLK_F_RO		(1ull << 5)
#define VIRTIO_BLK_F_FLUSH	(1ull << 9)

#define T_IN		0
#define T_OUT		1
#define T_FLUSH		4
#define T_GET_ID	8
#define S_OK		0
#define S_IOERR		1
#define S_UNSUPP	2

#define SECTOR		512
#define RUN		4		/* sectors per request */
#define SEED_DEFAULT	0x5eed0001u
#define TIMEOUT		5		/* seconds per request */

struct blk_req {
	u32 type, reserved;
	u64 sector;
};

static struct {
	struct blk_req hdr;
	u8 status;
	u8 pad[3];
	char id[20];
} *io;
static u32 *data;			/* RUN sectors */

static void fill(u32 *w, u64 n, u32 seed)
{
	u32 x = (u32)n * 0x9e3779b1u + 4 * 0x85ebca77u;

	w[0] = 0x6b6d6d76;
	w[1] = (u32)n;
	w[2] = (u32)(n >> 32);
	w[3] = seed;
	for (unsigned i = 4; i < SECTOR / 4; i++, x += 0x85ebca77u)
		w[i] = x ^ seed;
}

/* Returns the first differing word, or -1. */
static int check(const u32 *w, u64 n, u32 seed)
{
	u32 x = (u32)n * 0x9e3779b1u + 4 * 0x85ebca77u;

	if (w[0] != 0x6b6d6d76 || w[1] != (u32)n || w[2] != (u32)(n >> 32) || w[3] != seed)
		return w[0] != 0x6b6d6d76 ? 0 : w[1] != (u32)n ? 1 : w[2] != (u32)(n >> 32) ? 2 : 3;
	for (unsigned i = 4; i < SECTOR / 4; i++, x += 0x85ebca77u)
		if (w[i] != (x ^ seed))
			return i;
	return -1;
}

/* One request; the device's status byte, or -1 (message in *err). */
static int request(struct virtq *q, u32 type, u64 sector, void *buf, u32 len,
		   const char **err)
{
	struct vbuf b[3];
	unsigned n = 0;

	io->hdr.type = type;
	io->hdr.reserved = 0;
	io->hdr.sector = sector;
	io->status = 0xff;
	b[n++] = (struct vbuf){ &io->hdr, sizeof(io->hdr), false };
	if (len)
		b[n++] = (struct vbuf){ buf, len, type != T_OUT };
	b[n++] = (struct vbuf){ &io->status, 1, true };
	*err = virtq_transfer(q, b, n, NULL, TIMEOUT);
	return *err ? -1 : READ_ONCE(io->status);
}

static const char *what(int st, const char *err)
{
	static char buf[24];

	if (st < 0)
		return err;
	if (st == S_OK)
		return "OK";
	snprintf(buf, sizeof(buf), "status %s", st == S_IOERR ? "IOERR" :
		 st == S_UNSUPP ? "UNSUPP" : "not written");
	return buf;
}

static u32 seed_from_cmdline(void)
{
	size_t len;
	const char *v = cmdline_value(boot_info->cmdline, "blk.seed", 0, &len);
	u64 seed;

	if (v && cmdline_parse_u64(&v, v + len, &seed, false))
		return (u32)seed;
	return SEED_DEFAULT;
}

static void run_blk(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, 0);
	u32 seed = seed_from_cmdline();
	u64 cap, runs[3];
	char serial[21];
	const char *err;
	int st;

	if (!d) {
		report_fail("blk", "no virtio-blk device");
		return;
	}
	if (!io)
		io = dma_alloc(sizeof(*io), 64);
	if (!data)
		data = dma_alloc(RUN * SECTOR, 4096);
	if (!io || !data) {
		report_fail("blk", "out of DMA memory");
		return;
	}
	err = virtio_start(d, VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO, 1);
	if (err) {
		report_fail("blk", "%s: %s", d->where, err);
		return;
	}
	cap = virtio_config64(d, 0);
	info("virtio", "blk: %s capacity %llu sectors, features 0x%llx", d->where,
	     (unsigned long long)cap, (unsigned long long)d->features);
	if (d->features & VIRTIO_BLK_F_RO) {
		report_fail("blk", "the device is read-only");
		goto out;
	}
	if (cap < 3 * RUN) {
		report_fail("blk", "capacity %llu sectors is below %u", (unsigned long long)cap,
			    3 * RUN);
		goto out;
	}

	/* The serial: up to 20 bytes, NUL-padded. */
	memset(io->id, 0, sizeof(io->id));
	st = request(&d->vq[0], T_GET_ID, 0, io->id, sizeof(io->id), &err);
	if (st < 0) {
		report_fail("blk", "GET_ID: %s", err);
		goto out;
	}
	if (st == S_OK) {
		unsigned i;

		for (i = 0; i < 20 && io->id[i]; i++)
			serial[i] = io->id[i] >= 0x20 && io->id[i] < 0x7f ? io->id[i] : '?';
		serial[i] = 0;
	} else if (st == S_UNSUPP) {
		strlcpy(serial, "(unsupported)", sizeof(serial));
	} else {
		report_fail("blk", "GET_ID: %s", what(st, err));
		goto out;
	}

	runs[0] = 0;
	runs[1] = cap / 2 - RUN / 2;
	runs[2] = cap - RUN;
	for (unsigned r = 0; r < 3; r++) {
		for (unsigned s = 0; s < RUN; s++)
			fill(data + s * (SECTOR / 4), runs[r] + s, seed);
		st = request(&d->vq[0], T_OUT, runs[r], data, RUN * SECTOR, &err);
		if (st != S_OK) {
			report_fail("blk", "write at sector %llu: %s", (unsigned long long)runs[r],
				    what(st, err));
			goto out;
		}
	}
	if (d->features & VIRTIO_BLK_F_FLUSH) {
		st = request(&d->vq[0], T_FLUSH, 0, NULL, 0, &err);
		if (st != S_OK) {
			report_fail("blk", "flush: %s", what(st, err));
			goto out;
		}
	}
	for (unsigned r = 0; r < 3; r++) {
		memset(data, 0, RUN * SECTOR);
		st = request(&d->vq[0], T_IN, runs[r], data, RUN * SECTOR, &err);
		if (st != S_OK) {
			report_fail("blk", "read at sector %llu: %s", (unsigned long long)runs[r],
				    what(st, err));
			goto out;
		}
		for (unsigned s = 0; s < RUN; s++) {
			int bad = check(data + s * (SECTOR / 4), runs[r] + s, seed);

			if (bad >= 0) {
				report_fail("blk", "sector %llu word %d reads back 0x%x",
					    (unsigned long long)(runs[r] + s), bad,
					    data[s * (SECTOR / 4) + bad]);
				goto out;
			}
		}
	}

	/* One sector at <capacity>: just past the end. */
	st = request(&d->vq[0], T_IN, cap, data, SECTOR, &err);
	if (st != S_IOERR) {
		report_fail("blk", "read at sector %llu (past the end): %s, not IOERR",
			    (unsigned long long)cap, what(st, err));
		goto out;
	}
	report_ok("blk", "(%llu sectors, serial '%s', wrote and read back sectors "
		  "%llu-%llu %llu-%llu %llu-%llu seed 0x%x, %s, past the end: IOERR)",
		  (unsigned long long)cap, serial,
		  (unsigned long long)runs[0], (unsigned long long)runs[0] + RUN - 1,
		  (unsigned long long)runs[1], (unsigned long long)runs[1] + RUN - 1,
		  (unsigned long long)runs[2], (unsigned long long)runs[2] + RUN - 1,
		  seed, d->features & VIRTIO_BLK_F_FLUSH ? "flushed" : "no flush feature");
out:
	virtio_reset(d);
}
SELFTEST(blk, run_blk, "virtio-blk: capacity, serial, write, flush, read back, IOERR past the end");

/*
 * test=blkfill: writes blk.c's pattern to every sector of the first
 * virtio-blk device, RUN sectors per request, in order (a line
 * "selftest: info blkfill: <k>/<n> runs" every eighth of the way, so a host
 * can act while it writes: live migration), FLUSHes, then reads every run
 * back and compares. The host checks the image afterwards
 * (tests/integration/qemu_peer.py check_blk_image with rest_zero=False).
 */
static void run_blkfill(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, 0);
	u32 seed = seed_from_cmdline();
	u64 cap, runs;
	const char *err;
	int st;

	if (!d) {
		report_fail("blkfill", "no virtio-blk device");
		return;
	}
	if (!io)
		io = dma_alloc(sizeof(*io), 64);
	if (!data)
		data = dma_alloc(RUN * SECTOR, 4096);
	if (!io || !data) {
		report_fail("blkfill", "out of DMA memory");
		return;
	}
	err = virtio_start(d, VIRTIO_BLK_F_FLUSH, 1);
	if (err) {
		report_fail("blkfill", "%s: %s", d->where, err);
		return;
	}
	cap = virtio_config64(d, 0);
	runs = cap / RUN;
	if (!runs) {
		report_fail("blkfill", "capacity %llu sectors is below %u", (unsigned long long)cap, RUN);
		goto out;
	}
	info("blkfill", "writing %llu runs of %u sectors", (unsigned long long)runs, RUN);
	for (u64 r = 0; r < runs; r++) {
		for (unsigned s = 0; s < RUN; s++)
			fill(data + s * (SECTOR / 4), r * RUN + s, seed);
		st = request(&d->vq[0], T_OUT, r * RUN, data, RUN * SECTOR, &err);
		if (st != S_OK) {
			report_fail("blkfill", "write at sector %llu: %s", (unsigned long long)(r * RUN),
				    what(st, err));
			goto out;
		}
		if ((r + 1) % (runs / 8 ? runs / 8 : 1) == 0)
			info("blkfill", "%llu/%llu runs", (unsigned long long)(r + 1), (unsigned long long)runs);
	}
	if (d->features & VIRTIO_BLK_F_FLUSH) {
		st = request(&d->vq[0], T_FLUSH, 0, NULL, 0, &err);
		if (st != S_OK) {
			report_fail("blkfill", "flush: %s", what(st, err));
			goto out;
		}
	}
	for (u64 r = 0; r < runs; r++) {
		st = request(&d->vq[0], T_IN, r * RUN, data, RUN * SECTOR, &err);
		if (st != S_OK) {
			report_fail("blkfill", "read at sector %llu: %s", (unsigned long long)(r * RUN),
				    what(st, err));
			goto out;
		}
		for (unsigned s = 0; s < RUN; s++) {
			int bad = check(data + s * (SECTOR / 4), r * RUN + s, seed);

			if (bad >= 0) {
				report_fail("blkfill", "sector %llu word %d reads back 0x%x",
					    (unsigned long long)(r * RUN + s), bad,
					    data[s * (SECTOR / 4) + bad]);
				goto out;
			}
		}
	}
	report_ok("blkfill", "(%llu sectors written and read back, seed 0x%x)",
		  (unsigned long long)(runs * RUN), seed);
out:
	virtio_reset(d);
}
SELFTEST(blkfill, run_blkfill, "virtio-blk: the pattern on every sector, written in order, read back");
