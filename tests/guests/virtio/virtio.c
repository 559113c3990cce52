/*
 * The virtio core: device list, status handshake (virtio 1.2, 3.1.1),
 * configuration reads and polled split virtqueues (2.7).
 */
#include "arch.h"
#include "arch_io.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "timeout.h"
#include "virtio.h"

#define MAX_DEVICES 16

static struct virtio_dev devices[MAX_DEVICES];
static unsigned nr_devices;
static bool discovered;

/* Rings, buffers: NOLOAD, so they cost nothing at boot. */
#define DMA_POOL_SIZE (64 * 1024)
static u8 dma_pool[DMA_POOL_SIZE] __noinit __attribute__((aligned(4096)));
static size_t dma_used;

void *dma_alloc(size_t size, size_t align)
{
	size_t start = ALIGN_UP(dma_used, align);

	if (start + size > DMA_POOL_SIZE)
		return NULL;
	dma_used = start + size;
	return dma_pool + start;
}

const char *virtio_type_name(u32 type)
{
	static char buf[16];

	switch (type) {
	case VIRTIO_ID_NET: return "net";
	case VIRTIO_ID_BLOCK: return "blk";
	case VIRTIO_ID_CONSOLE: return "console";
	case VIRTIO_ID_RNG: return "rng";
	}
	snprintf(buf, sizeof(buf), "type %u", type);
	return buf;
}

struct virtio_dev *virtio_register(const struct virtio_transport *t, u32 type,
				   const char *where)
{
	struct virtio_dev *d;

	if (nr_devices == MAX_DEVICES) {
		info("virtio", "%s %s: too many devices, ignored", where,
		     virtio_type_name(type));
		return NULL;
	}
	d = &devices[nr_devices++];
	d->transport = t;
	d->type = type;
	strlcpy(d->where, where, sizeof(d->where));
	return d;
}

static void discover(void)
{
	if (discovered)
		return;
	discovered = true;
	arch_virtio_discover();
	for (unsigned i = 0; i < nr_devices; i++)
		info("virtio", "%s %s", devices[i].where, virtio_type_name(devices[i].type));
	if (!nr_devices)
		info("virtio", "no devices");
}

unsigned virtio_count(void)
{
	discover();
	return nr_devices;
}

struct virtio_dev *virtio_device(unsigned i)
{
	discover();
	return i < nr_devices ? &devices[i] : NULL;
}

struct virtio_dev *virtio_find(u32 type, unsigned n)
{
	discover();
	for (unsigned i = 0; i < nr_devices; i++)
		if (devices[i].type == type && n-- == 0)
			return &devices[i];
	return NULL;
}

/* -- status and features ------------------------------------------------ */

void virtio_reset(struct virtio_dev *d)
{
	struct timeout t;

	d->transport->set_status(d, 0);
	/* A reset may complete later: wait for status 0 (4.1.4.3.2, 4.2.2.2). */
	timeout_start(&t, 1);
	while (d->transport->get_status(d) && !timeout_expired(&t))
		arch_cpu_relax();
	for (unsigned i = 0; i < VIRTIO_MAX_QUEUES; i++)
		d->vq[i].size = 0;
	d->nr_vqs = 0;
}

static const char *fail(struct virtio_dev *d, const char *fmt, ...) __printf(2, 3);
static const char *fail(struct virtio_dev *d, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(d->error, sizeof(d->error), fmt, ap);
	va_end(ap);
	d->transport->set_status(d, d->transport->get_status(d) | VIRTIO_S_FAILED);
	return d->error;
}

static const char *setup_queue(struct virtio_dev *d, unsigned index)
{
	struct virtq *q = &d->vq[index];
	unsigned max = d->transport->queue_max(d, index);
	unsigned size = VIRTQ_MAX_SIZE;
	u8 *p;

	if (!max)
		return "not available";
	while (size > max)		/* split rings: a power of 2 */
		size >>= 1;
	if (!q->page)
		q->page = dma_alloc(4096, 4096);
	if (!q->page)
		return "out of DMA memory";
	p = q->page;
	memset(p, 0, 4096);
	q->dev = d;
	q->index = index;
	q->size = size;
	q->desc = (void *)p;				/* 16 * size bytes */
	q->avail = (void *)(p + 16 * VIRTQ_MAX_SIZE);	/* 6 + 2 * size */
	q->used = (void *)(p + 512);			/* 6 + 8 * size, 4-aligned */
	for (unsigned i = 0; i < size; i++)
		q->desc[i].next = i + 1;
	q->free_head = 0;
	q->num_free = size;
	q->last_used = 0;
	q->avail_idx = 0;
	q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	return d->transport->queue_enable(d, q);
}

const char *virtio_start(struct virtio_dev *d, u64 wanted, unsigned nr_vqs)
{
	const struct virtio_transport *t = d->transport;
	u64 offered;
	const char *err;

	virtio_reset(d);
	if (t->get_status(d))
		return fail(d, "status 0x%x after reset", t->get_status(d));
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE);
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);

	offered = t->get_features(d, 0) | (u64)t->get_features(d, 1) << 32;
	if (!(offered & VIRTIO_F_VERSION_1))
		return fail(d, "no VIRTIO_F_VERSION_1 (features 0x%llx)",
			    (unsigned long long)offered);
	d->features = offered & (wanted | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
	t->set_features(d, 0, (u32)d->features);
	t->set_features(d, 1, (u32)(d->features >> 32));
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK);
	if (!(t->get_status(d) & VIRTIO_S_FEATURES_OK))
		return fail(d, "FEATURES_OK not accepted (features 0x%llx)",
			    (unsigned long long)d->features);

	if (nr_vqs > VIRTIO_MAX_QUEUES)
		return fail(d, "%u queues wanted", nr_vqs);
	for (unsigned i = 0; i < nr_vqs; i++) {
		err = setup_queue(d, i);
		if (err)
			return fail(d, "queue %u: %s", i, err);
	}
	d->nr_vqs = nr_vqs;
	t->set_status(d, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER |
		      VIRTIO_S_FEATURES_OK | VIRTIO_S_DRIVER_OK);
	if (t->get_status(d) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED))
		return fail(d, "status 0x%x after DRIVER_OK", t->get_status(d));
	return NULL;
}

/* -- configuration space ------------------------------------------------- */

/* A field of n = 1, 2, 4 or 8 bytes (bytewise = false), or n single bytes. */
static void config_read(struct virtio_dev *d, unsigned offset, u8 *buf, unsigned n,
			bool bytewise)
{
	const struct virtio_transport *t = d->transport;
	u32 before, after;
	unsigned tries = 0;

	do {
		before = t->config_generation(d);
		if (!bytewise && (n == 1 || n == 2 || n == 4)) {
			u32 v = t->config_read(d, offset, n);

			memcpy(buf, &v, n);
		} else if (!bytewise && n == 8) {
			u32 lo = t->config_read(d, offset, 4);
			u32 hi = t->config_read(d, offset + 4, 4);

			memcpy(buf, &lo, 4);
			memcpy(buf + 4, &hi, 4);
		} else {
			for (unsigned i = 0; i < n; i++)
				buf[i] = t->config_read(d, offset + i, 1);
		}
		after = t->config_generation(d);
	} while (before != after && ++tries < 10);
}

u8 virtio_config8(struct virtio_dev *d, unsigned offset)
{
	u8 v;

	config_read(d, offset, &v, 1, false);
	return v;
}

u16 virtio_config16(struct virtio_dev *d, unsigned offset)
{
	u16 v;

	config_read(d, offset, (u8 *)&v, 2, false);
	return v;
}

u32 virtio_config32(struct virtio_dev *d, unsigned offset)
{
	u32 v;

	config_read(d, offset, (u8 *)&v, 4, false);
	return v;
}

u64 virtio_config64(struct virtio_dev *d, unsigned offset)
{
	u64 v;

	config_read(d, offset, (u8 *)&v, 8, false);
	return v;
}

void virtio_config_bytes(struct virtio_dev *d, unsigned offset, u8 *buf, unsigned n)
{
	config_read(d, offset, buf, n, true);
}

/* -- virtqueues ----------------------------------------------------------- */

int virtq_add(struct virtq *q, const struct vbuf *bufs, unsigned n)
{
	u16 head, i, last = 0;

	if (!q->size || !n || n > q->num_free)
		return -1;
	head = i = q->free_head;
	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *d = &q->desc[i];

		d->addr = dma_addr(bufs[k].addr);
		d->len = bufs[k].len;
		d->flags = (bufs[k].device_writes ? VIRTQ_DESC_F_WRITE : 0) |
			   (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
		last = i;
		i = d->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free -= n;
	q->avail->ring[q->avail_idx % q->size] = head;
	dma_wmb();		/* descriptors and ring entry before the index */
	q->avail_idx++;
	WRITE_ONCE(q->avail->idx, q->avail_idx);
	return head;
}

void virtq_kick(struct virtq *q)
{
	dma_mb();		/* the index before the notification */
	q->dev->transport->notify(q->dev, q);
}

int virtq_get_used(struct virtq *q, u32 *len)
{
	struct virtq_used_elem e;
	u16 i, n = 1;

	if (READ_ONCE(q->used->idx) == q->last_used)
		return -1;
	dma_rmb();		/* the index before the element */
	e = q->used->ring[q->last_used % q->size];
	q->last_used++;
	if (e.id >= q->size)
		return -1;
	if (len)
		*len = e.len;
	/* Return the chain to the free list. */
	for (i = e.id; q->desc[i].flags & VIRTQ_DESC_F_NEXT; i = q->desc[i].next)
		n++;
	q->desc[i].next = q->free_head;
	q->free_head = e.id;
	q->num_free += n;
	return e.id;
}

bool virtq_wait(struct virtq *q, int head, u32 *len, unsigned seconds)
{
	struct timeout t;

	timeout_start(&t, seconds);
	for (;;) {
		int id = virtq_get_used(q, len);

		if (id == head)
			return true;
		if (id < 0 && timeout_expired(&t))
			return false;
		arch_cpu_relax();
	}
}

const char *virtq_transfer(struct virtq *q, const struct vbuf *bufs, unsigned n,
			   u32 *len, unsigned seconds)
{
	static char msg[80];
	int head = virtq_add(q, bufs, n);

	if (head < 0)
		return "no free descriptors";
	virtq_kick(q);
	if (virtq_wait(q, head, len, seconds))
		return NULL;
	snprintf(msg, sizeof(msg), "queue %u: no used buffer after %u s (status 0x%x)",
		 q->index, seconds, q->dev->transport->get_status(q->dev));
	return msg;
}
