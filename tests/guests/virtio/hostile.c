/*
 * test=hostile: malformed requests through the real rings of the first
 * virtio-blk device (and of virtio-rng / virtio-console when present), one
 * scenario at a time, the device reset and started again before each.
 *
 * For each scenario the guest writes the descriptors, the available ring and
 * the index itself (not through virtq_add, which would refuse them), notifies
 * the device and waits (bounded, HOSTILE_WAIT seconds) for what it does:
 *
 *	selftest: info hostile <scenario>: <outcome>
 *
 * <outcome> starts with one word:
 *	OK | IOERR | UNSUPP | status-0x<nn>	the chain was used and its status
 *					byte says this (then "(used len <n>)")
 *	used				the chain was used, the status byte was
 *					not written ("(id <i> len <n>)")
 *	NEEDS_RESET			DEVICE_NEEDS_RESET in the status register,
 *					nothing used ("(status 0x<s>)")
 *	none				neither within the wait
 * and a used chain with DEVICE_NEEDS_RESET also set says ", NEEDS_RESET".
 * Two scenarios say something else: reset-in-flight ("reset" once the device
 * reads status 0 after a reset written right behind a notification, else
 * "still-running") and features-unoffered ("FEATURES_OK-refused" or
 * "-accepted" when the driver asks for every feature bit).
 * Scenarios that need something absent say "skipped (<why>)".
 *
 * After each scenario the device is reset and must start again and serve a
 * valid request (blk: a 1-sector read of sector 0; rng: 16 bytes), else
 * "FAIL hostile: <scenario>: ...". At the end a valid write of sectors
 * 16-17 (test=blk's pattern, seed HOSTILE_SEED), a FLUSH and the read-back
 * must work: "ok hostile (<n> scenarios, device still usable)".
 *
 * Nothing else is written to the disk by a request a correct device accepts:
 * every scenario is a read, except past-capacity-write and
 * sector-overflow-write, which must not reach the image (a harness checks
 * that only sectors 16-17 changed).
 *
 * "hostile.only=<a>,<b>" runs only the named scenarios, "hostile.skip=..."
 * leaves them out (a VMM that dies on one can be run past it).
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "timeout.h"
#include "virtio.h"

#define VIRTIO_F_INDIRECT_DESC	(1ull << 28)
#define VIRTIO_BLK_F_FLUSH	(1ull << 9)
#define VIRTQ_DESC_F_INDIRECT	4
#define F_NEXT			VIRTQ_DESC_F_NEXT
#define F_WRITE			VIRTQ_DESC_F_WRITE
#define F_INDIRECT		VIRTQ_DESC_F_INDIRECT

#define T_IN		0
#define T_OUT		1
#define T_FLUSH		4
#define S_OK		0
#define S_IOERR		1
#define S_UNSUPP	2
#define S_UNTOUCHED	0xee		/* what we put in the status byte */

#define SECTOR		512
#define HOSTILE_WAIT	1		/* seconds per scenario */
#define HOSTILE_SEED	0x5eed0bad
#define FINAL_SECTOR	16		/* the valid write: sectors 16-17 */
#define SCRATCH_SIZE	(1u << 20)	/* free RAM for the oversized indirect table */

struct blk_hdr {
	u32 type, reserved;
	u64 sector;
};

/* Everything the requests point at (DMA memory, one allocation). */
struct hostile_io {
	struct virtq_desc table[8];	/* an indirect table (16-aligned) */
	struct blk_hdr hdr;
	u8 status;
	u8 pad[15];
	u8 data[2 * SECTOR];
};

struct ctx {
	struct virtio_dev *d;
	struct virtq *q;
	struct hostile_io *io;
	u64 cap;		/* blk capacity, sectors */
	u64 outside;		/* an address in no RAM entry of the memory map */
	u64 own_mmio;		/* the device's own register window */
	u64 scratch;		/* SCRATCH_SIZE bytes of free RAM, or 0 */
	bool uses_status;	/* the outcome reads io->status */
	const char *result;	/* set by a scenario that reports its own outcome */
};

struct scenario {
	const char *name;
	u32 device;		/* VIRTIO_ID_* */
	u64 features;		/* negotiated on top of the defaults */
	unsigned queues;
	/* Build and submit; NULL, or why it cannot run here. */
	const char *(*run)(struct ctx *c);
	bool manual_start;	/* run() does the status handshake itself */
};

static struct hostile_io *io;

/* -- building requests ---------------------------------------------------- */

static u64 A(const void *p)
{
	return dma_addr(p);
}

static void put(struct virtq_desc *t, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
	t[i].addr = addr;
	t[i].len = len;
	t[i].flags = flags;
	t[i].next = next;
}

static void header(struct ctx *c, u32 type, u64 sector)
{
	c->io->hdr.type = type;
	c->io->hdr.reserved = 0;
	c->io->hdr.sector = sector;
	c->io->status = S_UNTOUCHED;
	c->uses_status = true;
}

/* A 1-sector read as descriptors first, first + 1, first + 2 of table t. */
static void read_chain(struct ctx *c, struct virtq_desc *t, u16 first)
{
	header(c, T_IN, 0);
	put(t, first, A(&c->io->hdr), sizeof(c->io->hdr), F_NEXT, first + 1);
	put(t, first + 1, A(c->io->data), SECTOR, F_NEXT | F_WRITE, first + 2);
	put(t, first + 2, A(&c->io->status), 1, F_WRITE, 0);
}

/* Make `head` available, moving the index by `advance`, and notify. */
static void submit_n(struct ctx *c, u16 head, u16 advance)
{
	struct virtq *q = c->q;

	q->avail->ring[q->avail_idx % q->size] = head;
	dma_wmb();
	q->avail_idx += advance;
	WRITE_ONCE(q->avail->idx, q->avail_idx);
	virtq_kick(q);
}

static void submit(struct ctx *c, u16 head)
{
	submit_n(c, head, 1);
}

/* -- virtio-blk scenarios ------------------------------------------------- */

static const char *addr_outside_ram(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].addr = c->outside;
	submit(c, 0);
	return NULL;
}

static const char *addr_own_mmio(struct ctx *c)
{
	/* A read: the device would write the sector onto its own registers. */
	if (!c->own_mmio)
		return "no register address";
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].addr = c->own_mmio;
	submit(c, 0);
	return NULL;
}

static const char *addr_beyond_2_48(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].addr = 1ull << 48;
	submit(c, 0);
	return NULL;
}

static const char *addr_wraps_2_64(struct ctx *c)
{
	/* [2^64 - 4 KiB, +8 KiB): wraps around to 0x1000, which is RAM. */
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].addr = ~0ull - 0xfff;
	c->q->desc[1].len = 0x2000;
	submit(c, 0);
	return NULL;
}

static const char *header_outside_ram(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[0].addr = c->outside;
	submit(c, 0);
	return NULL;
}

static const char *loop(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[2].flags |= F_NEXT;		/* status -> data -> status ... */
	c->q->desc[2].next = 1;
	submit(c, 0);
	return NULL;
}

static const char *self_loop(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[0].next = 0;			/* header -> header ... */
	submit(c, 0);
	return NULL;
}

static const char *zero_len_header(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[0].len = 0;
	submit(c, 0);
	return NULL;
}

static const char *zero_len_data(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].len = 0;
	submit(c, 0);
	return NULL;
}

static const char *zero_len_status(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[2].len = 0;
	submit(c, 0);
	return NULL;
}

static const char *huge_len_header(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[0].len = 0xffffffff;
	submit(c, 0);
	return NULL;
}

static const char *huge_len_data(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].len = 0xffffffff;
	submit(c, 0);
	return NULL;
}

static const char *writable_header(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[0].flags |= F_WRITE;
	submit(c, 0);
	return NULL;
}

static const char *readonly_status(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[2].flags &= ~F_WRITE;	/* readable after writable */
	submit(c, 0);
	return NULL;
}

static const char *flush_readonly_status(struct ctx *c)
{
	/* header, status, both device-readable: nowhere to put a status */
	header(c, T_FLUSH, 0);
	put(c->q->desc, 0, A(&c->io->hdr), sizeof(c->io->hdr), F_NEXT, 1);
	put(c->q->desc, 1, A(&c->io->status), 1, 0, 0);
	submit(c, 0);
	return NULL;
}

static const char *head_out_of_range(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	submit(c, c->q->size);
	return NULL;
}

static const char *next_out_of_range(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	c->q->desc[1].next = c->q->size;
	submit(c, 0);
	return NULL;
}

static const char *avail_idx_jump(struct ctx *c)
{
	read_chain(c, c->q->desc, 0);
	submit_n(c, 0, c->q->size + 1);
	return NULL;
}

static const char *notify_bad_queue(struct ctx *c)
{
	/*
	 * A valid request, but the notification names queue 7 (none). One
	 * properly notified request first, so that no notification of queue 0
	 * (e.g. one a device gives itself at DRIVER_OK) is still pending.
	 */
	struct virtq *q = c->q;
	struct vbuf b[3];
	const char *err;

	header(c, T_IN, 0);
	b[0] = (struct vbuf){ &c->io->hdr, sizeof(c->io->hdr), false };
	b[1] = (struct vbuf){ c->io->data, SECTOR, true };
	b[2] = (struct vbuf){ &c->io->status, 1, true };
	err = virtq_transfer(q, b, 3, NULL, 5);
	if (err)
		return err;
	read_chain(c, q->desc, 0);
	q->avail->ring[q->avail_idx % q->size] = 0;
	dma_wmb();
	WRITE_ONCE(q->avail->idx, ++q->avail_idx);
	dma_mb();
	if (!strcmp(c->d->transport->name, "mmio"))
		mmio_write32(c->d->base + 0x50, 7);
	else if (c->d->notify_base)
		mmio_write16(c->d->notify_base + 7 * c->d->notify_mult, 7);
	else
		return "unknown transport";
	return NULL;
}

static const char *indirect(struct ctx *c, u32 len, u16 flags)
{
	put(c->q->desc, 0, A(c->io->table), len, flags, 1);
	put(c->q->desc, 1, A(&c->io->status), 1, F_WRITE, 0);
	submit(c, 0);
	return NULL;
}

static const char *indirect_not_negotiated(struct ctx *c)
{
	read_chain(c, c->io->table, 0);
	return indirect(c, 3 * 16, F_INDIRECT);
}

static const char *indirect_nested(struct ctx *c)
{
	read_chain(c, c->io->table, 1);
	put(c->io->table, 0, A(&c->io->table[1]), 3 * 16, F_INDIRECT, 0);
	return indirect(c, 4 * 16, F_INDIRECT);
}

static const char *indirect_oversized(struct ctx *c)
{
	/* A valid chain at the start of a table that claims 65536 entries. */
	struct virtq_desc *t = phys(c->scratch);

	if (!c->scratch)
		return "no free RAM for a 1 MiB table";
	read_chain(c, t, 0);
	put(c->q->desc, 0, c->scratch, 65536 * 16, F_INDIRECT, 0);
	submit(c, 0);
	return NULL;
}

static const char *indirect_bad_len(struct ctx *c)
{
	read_chain(c, c->io->table, 0);
	return indirect(c, 40, F_INDIRECT);
}

static const char *indirect_with_next(struct ctx *c)
{
	read_chain(c, c->io->table, 0);
	return indirect(c, 3 * 16, F_INDIRECT | F_NEXT);
}

static const char *indirect_loop(struct ctx *c)
{
	read_chain(c, c->io->table, 0);
	c->io->table[2].flags |= F_NEXT;
	c->io->table[2].next = 1;
	return indirect(c, 3 * 16, F_INDIRECT);
}

static const char *indirect_too_many(struct ctx *c)
{
	/* 1100 descriptors (more than the 1024 segments of Linux's and QEMU's limits):
	 * header, 1098 device-writable 512-byte buffers (all the same sector's worth of
	 * scratch RAM), status. */
	struct virtq_desc *t = phys(c->scratch);
	u16 n = 1100;

	if (!c->scratch)
		return "no free RAM for the table";
	header(c, T_IN, 0);
	put(t, 0, A(&c->io->hdr), sizeof(c->io->hdr), F_NEXT, 1);
	for (u16 i = 1; i < n - 1; i++)
		put(t, i, c->scratch + 65536, SECTOR, F_NEXT | F_WRITE, i + 1);
	put(t, n - 1, A(&c->io->status), 1, F_WRITE, 0);
	put(c->q->desc, 0, c->scratch, n * 16, F_INDIRECT, 0);
	submit(c, 0);
	return NULL;
}

static const char *blk_rw(struct ctx *c, u32 type, u64 sector, u32 len)
{
	header(c, type, sector);
	memset(c->io->data, 0xa5, sizeof(c->io->data));
	put(c->q->desc, 0, A(&c->io->hdr), sizeof(c->io->hdr), F_NEXT, 1);
	put(c->q->desc, 1, A(c->io->data), len, F_NEXT | (type == T_OUT ? 0 : F_WRITE), 2);
	put(c->q->desc, 2, A(&c->io->status), 1, F_WRITE, 0);
	submit(c, 0);
	return NULL;
}

static const char *past_capacity_read(struct ctx *c)
{
	return blk_rw(c, T_IN, c->cap - 1, 2 * SECTOR);	/* straddles the end */
}

static const char *past_capacity_write(struct ctx *c)
{
	return blk_rw(c, T_OUT, c->cap, SECTOR);
}

static const char *sector_overflow_write(struct ctx *c)
{
	return blk_rw(c, T_OUT, 1ull << 55, SECTOR);	/* * 512 = 2^64: offset 0 */
}

static const char *partial_sector(struct ctx *c)
{
	return blk_rw(c, T_IN, 0, 100);
}

static const char *unknown_type(struct ctx *c)
{
	return blk_rw(c, 0x7fff, 0, SECTOR);
}

static const char *reset_in_flight(struct ctx *c)
{
	/* A valid read, and the device reset right after the notification. */
	static char msg[64];
	struct virtio_dev *d = c->d;
	struct timeout t;
	u8 st;

	read_chain(c, c->q->desc, 0);
	submit(c, 0);
	d->transport->set_status(d, 0);
	timeout_start(&t, 1);
	while ((st = d->transport->get_status(d)) && !timeout_expired(&t))
		arch_cpu_relax();
	snprintf(msg, sizeof(msg), "%s (status 0x%x after the reset)", st ? "still-running" : "reset", st);
	c->result = msg;
	return NULL;
}

static const char *features_unoffered(struct ctx *c)
{
	/* Every feature bit, offered or not: FEATURES_OK must not stick. */
	static char msg[64];
	struct virtio_dev *d = c->d;
	const struct virtio_transport *t = d->transport;
	u8 s = VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER;

	virtio_reset(d);
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE);
	t->set_status(d, s);
	t->set_features(d, 0, 0xffffffff);
	t->set_features(d, 1, 0xffffffff);
	t->set_status(d, s | VIRTIO_S_FEATURES_OK);
	s = t->get_status(d);
	snprintf(msg, sizeof(msg), "%s (status 0x%x)",
		 s & VIRTIO_S_FEATURES_OK ? "FEATURES_OK-accepted" : "FEATURES_OK-refused", s);
	c->result = msg;
	return NULL;
}

/* The status handshake of virtio_start, with queue 0 placed as told. */
static const char *start_manually(struct ctx *c, u64 desc, u16 size)
{
	struct virtio_dev *d = c->d;
	const struct virtio_transport *t = d->transport;
	struct virtq *q = &d->vq[0];
	u8 s;

	virtio_reset(d);
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE);
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);
	t->set_features(d, 0, 0);
	t->set_features(d, 1, (u32)(VIRTIO_F_VERSION_1 >> 32));
	s = VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK;
	t->set_status(d, s);
	if (!(t->get_status(d) & VIRTIO_S_FEATURES_OK))
		return "FEATURES_OK refused";
	if (!q->page)
		return "no ring page";
	if (!size) {
		size = VIRTQ_MAX_SIZE;
		while (size > t->queue_max(d, 0))
			size >>= 1;
	}
	memset(q->page, 0, 4096);
	q->dev = d;
	q->index = 0;
	q->size = size;
	q->desc = phys(desc);
	q->avail = (void *)((u8 *)q->page + 256);
	q->used = (void *)((u8 *)q->page + 512);
	q->avail_idx = q->last_used = 0;
	/* A device may refuse the queue here already: that is an outcome too. */
	t->queue_enable(d, q);
	t->set_status(d, s | VIRTIO_S_DRIVER_OK);
	c->q = q;
	return NULL;
}

static const char *ring_outside_ram(struct ctx *c)
{
	const char *err = start_manually(c, c->outside, 0);

	if (err)
		return err;
	/* The descriptors are nowhere: make entry 0 available anyway. */
	c->uses_status = false;
	submit(c, 0);
	return NULL;
}

static const char *ring_size_not_pow2(struct ctx *c)
{
	const char *err = start_manually(c, dma_addr(c->q->page), 12);

	if (err)
		return err;
	read_chain(c, c->q->desc, 0);
	submit(c, 0);
	return NULL;
}

/* -- virtio-rng and virtio-console ------------------------------------------ */

static const char *rng_readonly_buffer(struct ctx *c)
{
	put(c->q->desc, 0, A(c->io->data), 64, 0, 0);
	c->uses_status = false;
	submit(c, 0);
	return NULL;
}

static const char *console_tx_writable(struct ctx *c)
{
	c->q = &c->d->vq[1];			/* transmitq of port 0 */
	memset(c->io->data, 0, 64);
	put(c->q->desc, 0, A(c->io->data), 64, F_WRITE, 0);
	c->uses_status = false;
	submit(c, 0);
	return NULL;
}

#define BLK(n, fn, f)	{ n, VIRTIO_ID_BLOCK, f, 1, fn, false }
static const struct scenario scenarios[] = {
	BLK("addr-outside-ram", addr_outside_ram, 0),
	BLK("addr-own-mmio", addr_own_mmio, 0),
	BLK("addr-beyond-2^48", addr_beyond_2_48, 0),
	BLK("addr-wraps-2^64", addr_wraps_2_64, 0),
	BLK("header-outside-ram", header_outside_ram, 0),
	BLK("loop", loop, 0),
	BLK("self-loop", self_loop, 0),
	BLK("zero-len-header", zero_len_header, 0),
	BLK("zero-len-data", zero_len_data, 0),
	BLK("zero-len-status", zero_len_status, 0),
	BLK("huge-len-header", huge_len_header, 0),
	BLK("huge-len-data", huge_len_data, 0),
	BLK("writable-header", writable_header, 0),
	BLK("readonly-status", readonly_status, 0),
	BLK("flush-readonly-status", flush_readonly_status, 0),
	BLK("head-out-of-range", head_out_of_range, 0),
	BLK("next-out-of-range", next_out_of_range, 0),
	BLK("avail-idx-jump", avail_idx_jump, 0),
	BLK("notify-bad-queue", notify_bad_queue, 0),
	BLK("indirect-not-negotiated", indirect_not_negotiated, 0),
	BLK("indirect-nested", indirect_nested, VIRTIO_F_INDIRECT_DESC),
	BLK("indirect-oversized", indirect_oversized, VIRTIO_F_INDIRECT_DESC),
	BLK("indirect-bad-len", indirect_bad_len, VIRTIO_F_INDIRECT_DESC),
	BLK("indirect-with-next", indirect_with_next, VIRTIO_F_INDIRECT_DESC),
	BLK("indirect-loop", indirect_loop, VIRTIO_F_INDIRECT_DESC),
	BLK("indirect-too-many", indirect_too_many, VIRTIO_F_INDIRECT_DESC),
	BLK("past-capacity-read", past_capacity_read, 0),
	BLK("past-capacity-write", past_capacity_write, 0),
	BLK("sector-overflow-write", sector_overflow_write, 0),
	BLK("partial-sector", partial_sector, 0),
	BLK("unknown-type", unknown_type, 0),
	BLK("reset-in-flight", reset_in_flight, 0),
	{ "features-unoffered", VIRTIO_ID_BLOCK, 0, 1, features_unoffered, true },
	{ "ring-outside-ram", VIRTIO_ID_BLOCK, 0, 1, ring_outside_ram, true },
	{ "ring-size-not-pow2", VIRTIO_ID_BLOCK, 0, 1, ring_size_not_pow2, true },
	{ "rng-readonly-buffer", VIRTIO_ID_RNG, 0, 1, rng_readonly_buffer, false },
	{ "console-tx-writable", VIRTIO_ID_CONSOLE, 0, 2, console_tx_writable, false },
};

/* -- running them ---------------------------------------------------------- */

static const char *status_word(u8 s)
{
	static char buf[16];

	if (s == S_OK)
		return "OK";
	if (s == S_IOERR)
		return "IOERR";
	if (s == S_UNSUPP)
		return "UNSUPP";
	snprintf(buf, sizeof(buf), "status-0x%02x", s);
	return buf;
}

/* Wait for the device's answer and describe it. */
static void outcome(struct ctx *c, char *out, size_t size)
{
	struct virtio_dev *d = c->d;
	struct virtq *q = c->q;
	struct timeout t;
	bool used = false;
	u8 st = 0;

	timeout_start(&t, HOSTILE_WAIT);
	for (unsigned polls = 0;; polls++) {
		if (READ_ONCE(q->used->idx) != q->last_used) {
			used = true;
			break;
		}
		if (!(polls & 15)) {
			st = d->transport->get_status(d);
			if (st & VIRTIO_S_NEEDS_RESET)
				break;
		}
		if (timeout_expired(&t))
			break;
		arch_cpu_relax();
	}
	if (!used && READ_ONCE(q->used->idx) != q->last_used)
		used = true;
	st = d->transport->get_status(d);
	if (used) {
		struct virtq_used_elem e;
		size_t n;

		dma_rmb();
		e = q->used->ring[q->last_used % q->size];
		if (c->uses_status && READ_ONCE(c->io->status) != S_UNTOUCHED)
			n = snprintf(out, size, "%s (used len %u)", status_word(c->io->status), e.len);
		else
			n = snprintf(out, size, "used (id %u len %u%s)", e.id, e.len,
				     c->uses_status ? ", status byte not written" : "");
		if (st & VIRTIO_S_NEEDS_RESET && n < size)
			snprintf(out + n, size - n, ", NEEDS_RESET");
	} else if (st & VIRTIO_S_NEEDS_RESET) {
		snprintf(out, size, "NEEDS_RESET (status 0x%x)", st);
	} else {
		snprintf(out, size, "none (nothing used in %u s, status 0x%x)", HOSTILE_WAIT, st);
	}
}

static u64 default_features(u32 device)
{
	return device == VIRTIO_ID_BLOCK ? VIRTIO_BLK_F_FLUSH : 0;
}

/* One valid request: NULL or what went wrong. */
static const char *valid_request(struct ctx *c)
{
	static char msg[96];
	const char *err;
	struct vbuf b[3];
	u32 len = 0;

	err = virtio_start(c->d, default_features(c->d->type), c->d->type == VIRTIO_ID_CONSOLE ? 2 : 1);
	if (err)
		return err;
	if (c->d->type == VIRTIO_ID_BLOCK) {
		header(c, T_IN, 0);
		b[0] = (struct vbuf){ &c->io->hdr, sizeof(c->io->hdr), false };
		b[1] = (struct vbuf){ c->io->data, SECTOR, true };
		b[2] = (struct vbuf){ &c->io->status, 1, true };
		err = virtq_transfer(&c->d->vq[0], b, 3, &len, 5);
		if (!err && c->io->status != S_OK) {
			snprintf(msg, sizeof(msg), "read of sector 0: %s", status_word(c->io->status));
			err = msg;
		}
	} else if (c->d->type == VIRTIO_ID_RNG) {
		b[0] = (struct vbuf){ c->io->data, 16, true };
		err = virtq_transfer(&c->d->vq[0], b, 1, &len, 5);
		if (!err && !len)
			err = "0 bytes of entropy";
	}
	return err;
}

static bool listed(const char *key, const char *name)
{
	size_t n = strlen(name), len;
	const char *v;

	for (unsigned k = 0; (v = cmdline_value(boot_info->cmdline, key, k, &len)); k++) {
		while (len) {
			size_t i = 0;

			while (i < len && v[i] != ',')
				i++;
			if (i == n && !strncmp(v, name, n))
				return true;
			v += i;
			len -= i;
			if (len) {
				v++;
				len--;
			}
		}
	}
	return false;
}

static bool selected(const char *name)
{
	size_t len;

	if (cmdline_value(boot_info->cmdline, "hostile.only", 0, &len) && !listed("hostile.only", name))
		return false;
	return !listed("hostile.skip", name);
}

/* The lowest address above all RAM, rounded up to 1 GiB: in no RAM entry. */
static u64 outside_ram(void)
{
	u64 top = 0;

	for (u32 i = 0; i < boot_info->nr_memmap; i++) {
		const struct memmap_entry *e = &boot_info->memmap[i];

		if (e->type == MEM_RAM && e->addr + e->size > top)
			top = e->addr + e->size;
	}
	return ALIGN_UP(top, 1ull << 30) + (1ull << 30);
}

/* SCRATCH_SIZE bytes of RAM past the image (unused by anything), or 0. */
static u64 scratch_ram(void)
{
	u64 at = ALIGN_UP((u64)(uintptr_t)_end, 1ull << 21) + (1ull << 21);

	return memmap_is_ram(boot_info, at, at + SCRATCH_SIZE) && at + SCRATCH_SIZE <= 1ull << 32 ? at : 0;
}

/* test=blk's pattern (README.md), for the final valid write. */
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

static const char *final_check(struct ctx *c)
{
	static char msg[96];
	u32 expect[SECTOR / 4];
	struct vbuf b[3];
	const char *err;
	int st;

	err = virtio_start(c->d, VIRTIO_BLK_F_FLUSH, 1);
	if (err)
		return err;
	for (int pass = 0; pass < 3; pass++) {
		u32 type = pass == 0 ? T_OUT : pass == 1 ? T_FLUSH : T_IN;
		unsigned n = 0;

		header(c, type, FINAL_SECTOR);
		if (type == T_OUT) {
			fill((u32 *)c->io->data, FINAL_SECTOR, HOSTILE_SEED);
			fill((u32 *)(c->io->data + SECTOR), FINAL_SECTOR + 1, HOSTILE_SEED);
		} else if (type == T_IN) {
			memset(c->io->data, 0, sizeof(c->io->data));
		}
		if (type == T_FLUSH && !(c->d->features & VIRTIO_BLK_F_FLUSH))
			continue;
		b[n++] = (struct vbuf){ &c->io->hdr, sizeof(c->io->hdr), false };
		if (type != T_FLUSH)
			b[n++] = (struct vbuf){ c->io->data, 2 * SECTOR, type == T_IN };
		b[n++] = (struct vbuf){ &c->io->status, 1, true };
		err = virtq_transfer(&c->d->vq[0], b, n, NULL, 5);
		if (err)
			return err;
		st = c->io->status;
		if (st != S_OK) {
			snprintf(msg, sizeof(msg), "%s of sectors %u-%u: %s",
				 type == T_OUT ? "write" : type == T_FLUSH ? "flush" : "read",
				 FINAL_SECTOR, FINAL_SECTOR + 1, status_word(st));
			return msg;
		}
	}
	for (unsigned s = 0; s < 2; s++) {
		fill(expect, FINAL_SECTOR + s, HOSTILE_SEED);
		if (memcmp(expect, c->io->data + s * SECTOR, SECTOR)) {
			snprintf(msg, sizeof(msg), "sector %u does not read back", FINAL_SECTOR + s);
			return msg;
		}
	}
	return NULL;
}

static void run_hostile(void)
{
	struct virtio_dev *blk = virtio_find(VIRTIO_ID_BLOCK, 0);
	struct ctx c;
	char what[48], out[96];
	unsigned ran = 0, unusable = 0;
	const char *err;

	if (!blk) {
		report_fail("hostile", "no virtio-blk device");
		return;
	}
	if (!io)
		io = dma_alloc(sizeof(*io), 64);
	if (!io) {
		report_fail("hostile", "out of DMA memory");
		return;
	}
	memset(&c, 0, sizeof(c));
	c.io = io;
	c.outside = outside_ram();
	c.scratch = scratch_ram();
	err = virtio_start(blk, VIRTIO_BLK_F_FLUSH, 1);
	if (err) {
		report_fail("hostile", "%s: %s", blk->where, err);
		return;
	}
	c.cap = virtio_config64(blk, 0);
	virtio_reset(blk);
	info("hostile", "blk %s, capacity %llu sectors, outside RAM 0x%llx, scratch 0x%llx",
	     blk->where, (unsigned long long)c.cap, (unsigned long long)c.outside,
	     (unsigned long long)c.scratch);

	for (unsigned i = 0; i < ARRAY_SIZE(scenarios); i++) {
		const struct scenario *s = &scenarios[i];
		struct virtio_dev *d = virtio_find(s->device, 0);

		if (!selected(s->name))
			continue;
		snprintf(what, sizeof(what), "hostile %s", s->name);
		if (!d) {
			info(what, "skipped (no %s device)", virtio_type_name(s->device));
			continue;
		}
		c.d = d;
		c.own_mmio = d->base ? d->base : d->common;
		c.uses_status = false;
		c.result = NULL;
		if (!s->manual_start) {
			err = virtio_start(d, default_features(s->device) | s->features, s->queues);
			if (err) {
				report_fail("hostile", "%s: %s: %s", s->name, d->where, err);
				virtio_reset(d);
				continue;
			}
			if (s->features & ~d->features) {
				info(what, "skipped (feature 0x%llx not offered)",
				     (unsigned long long)(s->features & ~d->features));
				virtio_reset(d);
				continue;
			}
		}
		c.q = &d->vq[0];	/* its ring page exists: blk was started above */
		err = s->run(&c);
		if (err) {
			info(what, "skipped (%s)", err);
			virtio_reset(d);
			continue;
		}
		ran++;
		if (c.result)
			strlcpy(out, c.result, sizeof(out));
		else
			outcome(&c, out, sizeof(out));
		info(what, "%s", out);
		virtio_reset(d);
		err = valid_request(&c);
		if (err) {
			report_fail("hostile", "%s: the device is unusable after a reset: %s",
				    s->name, err);
			unusable++;
		}
		virtio_reset(d);
	}

	c.d = blk;
	err = final_check(&c);
	virtio_reset(blk);
	if (err)
		report_fail("hostile", "valid requests after %u scenarios: %s", ran, err);
	else if (!unusable)
		report_ok("hostile", "(%u scenarios, device still usable)", ran);
}
SELFTEST(hostile, run_hostile, "malformed virtio requests; the device must stay usable");
