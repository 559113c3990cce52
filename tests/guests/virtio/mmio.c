/*
 * virtio-mmio, version 2 (virtio 1.2, 4.2.2), and the kernel command line
 * convention that announces such devices (Firecracker, QEMU microvm
 * without ACPI, vmmkit):
 *
 *	virtio_mmio.device=<size>@<base>:<irq>[:<id>]
 *
 * <size> and <base> take Linux memparse() syntax (decimal, 0x hex; a K, M
 * or G suffix), <irq> is decimal. Legacy (version 1) devices are not used.
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "virtio.h"
#include "virtio_mmio.h"

#define MMIO_MAGIC		0x000
#define MMIO_VERSION		0x004
#define MMIO_DEVICE_ID		0x008
#define MMIO_VENDOR_ID		0x00c
#define MMIO_DEV_FEATURES	0x010
#define MMIO_DEV_FEATURES_SEL	0x014
#define MMIO_DRV_FEATURES	0x020
#define MMIO_DRV_FEATURES_SEL	0x024
#define MMIO_QUEUE_SEL		0x030
#define MMIO_QUEUE_NUM_MAX	0x034
#define MMIO_QUEUE_NUM		0x038
#define MMIO_QUEUE_READY	0x044
#define MMIO_QUEUE_NOTIFY	0x050
#define MMIO_INT_STATUS		0x060	/* unused: we poll */
#define MMIO_STATUS		0x070
#define MMIO_QUEUE_DESC_LO	0x080
#define MMIO_QUEUE_DESC_HI	0x084
#define MMIO_QUEUE_DRIVER_LO	0x090
#define MMIO_QUEUE_DRIVER_HI	0x094
#define MMIO_QUEUE_DEVICE_LO	0x0a0
#define MMIO_QUEUE_DEVICE_HI	0x0a4
#define MMIO_CONFIG_GEN		0x0fc
#define MMIO_CONFIG		0x100

#define MMIO_MAGIC_VALUE	0x74726976	/* "virt" */

static u32 rd(struct virtio_dev *d, unsigned reg) { return mmio_read32(d->base + reg); }
static void wr(struct virtio_dev *d, unsigned reg, u32 v) { mmio_write32(d->base + reg, v); }

static void set_status(struct virtio_dev *d, u8 status) { wr(d, MMIO_STATUS, status); }
static u8 get_status(struct virtio_dev *d) { return rd(d, MMIO_STATUS); }

static u32 get_features(struct virtio_dev *d, unsigned word)
{
	wr(d, MMIO_DEV_FEATURES_SEL, word);
	return rd(d, MMIO_DEV_FEATURES);
}

static void set_features(struct virtio_dev *d, unsigned word, u32 value)
{
	wr(d, MMIO_DRV_FEATURES_SEL, word);
	wr(d, MMIO_DRV_FEATURES, value);
}

static u32 config_read(struct virtio_dev *d, unsigned offset, unsigned size)
{
	u64 a = d->base + MMIO_CONFIG + offset;

	return size == 1 ? mmio_read8(a) : size == 2 ? mmio_read16(a) : mmio_read32(a);
}

static u32 config_generation(struct virtio_dev *d) { return rd(d, MMIO_CONFIG_GEN); }

static unsigned queue_max(struct virtio_dev *d, unsigned index)
{
	wr(d, MMIO_QUEUE_SEL, index);
	if (rd(d, MMIO_QUEUE_READY))
		return 0;
	return rd(d, MMIO_QUEUE_NUM_MAX);
}

static const char *queue_enable(struct virtio_dev *d, struct virtq *q)
{
	u64 desc = dma_addr(q->desc), avail = dma_addr(q->avail), used = dma_addr(q->used);

	wr(d, MMIO_QUEUE_SEL, q->index);
	wr(d, MMIO_QUEUE_NUM, q->size);
	wr(d, MMIO_QUEUE_DESC_LO, (u32)desc);
	wr(d, MMIO_QUEUE_DESC_HI, (u32)(desc >> 32));
	wr(d, MMIO_QUEUE_DRIVER_LO, (u32)avail);
	wr(d, MMIO_QUEUE_DRIVER_HI, (u32)(avail >> 32));
	wr(d, MMIO_QUEUE_DEVICE_LO, (u32)used);
	wr(d, MMIO_QUEUE_DEVICE_HI, (u32)(used >> 32));
	wr(d, MMIO_QUEUE_READY, 1);
	if (rd(d, MMIO_QUEUE_READY) != 1)
		return "QueueReady does not read back 1";
	return NULL;
}

static void notify(struct virtio_dev *d, struct virtq *q)
{
	wr(d, MMIO_QUEUE_NOTIFY, q->index);
}

static const struct virtio_transport mmio_transport = {
	.name = "mmio",
	.set_status = set_status,
	.get_status = get_status,
	.get_features = get_features,
	.set_features = set_features,
	.config_read = config_read,
	.config_generation = config_generation,
	.queue_max = queue_max,
	.queue_enable = queue_enable,
	.notify = notify,
};

void virtio_mmio_probe(u64 base, u64 size, u32 irq)
{
	char where[40];
	u32 magic, version, type;
	struct virtio_dev *d;

	snprintf(where, sizeof(where), "mmio 0x%llx irq %u", (unsigned long long)base, irq);
	if (size < MMIO_CONFIG || !arch_map_mmio(base, size)) {
		report_fail("virtio", "%s: cannot map %llu bytes", where,
			    (unsigned long long)size);
		return;
	}
	magic = mmio_read32(base + MMIO_MAGIC);
	version = mmio_read32(base + MMIO_VERSION);
	type = mmio_read32(base + MMIO_DEVICE_ID);
	if (magic != MMIO_MAGIC_VALUE) {
		report_fail("virtio", "%s: magic 0x%x, not a virtio-mmio device", where, magic);
		return;
	}
	if (!type) {		/* a placeholder transport */
		info("virtio", "%s: no device", where);
		return;
	}
	if (version != 2) {
		info("virtio", "%s %s: version %u (legacy), not supported", where,
		     virtio_type_name(type), version);
		return;
	}
	d = virtio_register(&mmio_transport, type, where);
	if (d)
		d->base = base;
}

static void mmio_device_arg(const char *v, size_t len)
{
	const char *p = v, *end = v + len;
	u64 size, base, irq;

	if (!cmdline_parse_u64(&p, end, &size, true) || p == end || *p++ != '@' ||
	    !cmdline_parse_u64(&p, end, &base, true) || p == end || *p++ != ':' ||
	    !cmdline_parse_u64(&p, end, &irq, false) || (p != end && *p != ':') || !size) {
		report_fail("virtio", "cannot parse 'virtio_mmio.device=%.*s'", (int)len, v);
		return;
	}
	virtio_mmio_probe(base, size, (u32)irq);
}

void virtio_mmio_from_cmdline(const char *cmdline)
{
	const char *v;
	size_t len;

	for (unsigned n = 0; (v = cmdline_value(cmdline, "virtio_mmio.device", n, &len)); n++)
		mmio_device_arg(v, len);
}
