/*
 * virtio over PCI, modern interface only (virtio 1.2, 4.1): a scan of one
 * bus through the architecture's configuration accessors, the vendor
 * capabilities that locate the common / notify / ISR / device structures
 * in memory BARs, and BAR assignment for a firmware-less VMM that left
 * BARs at 0. Devices are polled: MSI-X stays off, INTx is disabled.
 */
#include "arch.h"
#include "arch_io.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "virtio.h"
#include "virtio_pci.h"

/* PCI configuration header */
#define PCI_VENDOR_ID		0x00
#define PCI_DEVICE_ID		0x02
#define PCI_COMMAND		0x04
#define PCI_STATUS		0x06
#define PCI_HEADER_TYPE		0x0e
#define PCI_BAR0		0x10
#define PCI_SUBSYSTEM_ID	0x2e
#define PCI_CAP_PTR		0x34
#define CMD_MEMORY		0x0002
#define CMD_MASTER		0x0004
#define CMD_INTX_DISABLE	0x0400
#define STATUS_CAP_LIST		0x0010
#define PCI_CAP_VENDOR		0x09

/* struct virtio_pci_cap */
#define CAP_CFG_TYPE		3
#define CAP_BAR			4
#define CAP_OFFSET		8
#define CAP_LENGTH		12
#define CAP_NOTIFY_MULT		16
enum { CFG_COMMON = 1, CFG_NOTIFY = 2, CFG_ISR = 3, CFG_DEVICE = 4 };

/* struct virtio_pci_common_cfg */
#define C_DFSELECT	0x00
#define C_DF		0x04
#define C_GFSELECT	0x08
#define C_GF		0x0c
#define C_MSIX		0x10	/* config_msix_vector: NO_VECTOR after reset */
#define C_NUMQ		0x12
#define C_STATUS	0x14
#define C_CFGGEN	0x15
#define C_Q_SELECT	0x16
#define C_Q_SIZE	0x18
#define C_Q_MSIX	0x1a
#define C_Q_ENABLE	0x1c
#define C_Q_NOFF	0x1e
#define C_Q_DESC	0x20
#define C_Q_DRIVER	0x28
#define C_Q_DEVICE	0x30
#define NO_VECTOR	0xffff

#define VIRTIO_VENDOR	0x1af4

/* -- the modern transport ----------------------------------------------- */

static void set_status(struct virtio_dev *d, u8 s) { mmio_write8(d->common + C_STATUS, s); }
static u8 get_status(struct virtio_dev *d) { return mmio_read8(d->common + C_STATUS); }

static u32 get_features(struct virtio_dev *d, unsigned word)
{
	mmio_write32(d->common + C_DFSELECT, word);
	return mmio_read32(d->common + C_DF);
}

static void set_features(struct virtio_dev *d, unsigned word, u32 value)
{
	mmio_write32(d->common + C_GFSELECT, word);
	mmio_write32(d->common + C_GF, value);
}

static u32 config_read(struct virtio_dev *d, unsigned offset, unsigned size)
{
	u64 a = d->device_cfg + offset;

	if (!d->device_cfg || offset + size > d->device_cfg_len)
		return 0;
	return size == 1 ? mmio_read8(a) : size == 2 ? mmio_read16(a) : mmio_read32(a);
}

static u32 config_generation(struct virtio_dev *d) { return mmio_read8(d->common + C_CFGGEN); }

static unsigned queue_max(struct virtio_dev *d, unsigned index)
{
	if (index >= mmio_read16(d->common + C_NUMQ))
		return 0;
	mmio_write16(d->common + C_Q_SELECT, index);
	if (mmio_read16(d->common + C_Q_ENABLE))
		return 0;
	return mmio_read16(d->common + C_Q_SIZE);
}

static void write64(u64 addr, u64 v)
{
	mmio_write32(addr, (u32)v);
	mmio_write32(addr + 4, (u32)(v >> 32));
}

static const char *queue_enable(struct virtio_dev *d, struct virtq *q)
{
	u64 off;

	mmio_write16(d->common + C_Q_SELECT, q->index);
	mmio_write16(d->common + C_Q_SIZE, q->size);
	mmio_write16(d->common + C_Q_MSIX, NO_VECTOR);
	write64(d->common + C_Q_DESC, dma_addr(q->desc));
	write64(d->common + C_Q_DRIVER, dma_addr(q->avail));
	write64(d->common + C_Q_DEVICE, dma_addr(q->used));
	off = (u64)mmio_read16(d->common + C_Q_NOFF) * d->notify_mult;
	q->notify = d->notify_base + off;
	mmio_write16(d->common + C_Q_ENABLE, 1);
	if (mmio_read16(d->common + C_Q_ENABLE) != 1)
		return "queue_enable does not read back 1";
	return NULL;
}

static void notify(struct virtio_dev *d, struct virtq *q)
{
	(void)d;
	mmio_write16(q->notify, q->index);
}

static const struct virtio_transport pci_transport = {
	.name = "pci",
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

/* -- the bus -------------------------------------------------------------- */

struct pci_fn {
	u8 bus, dev, fn;
	u16 vendor, device;
};

#define MAX_FNS 64
static struct pci_fn fns[MAX_FNS];
static unsigned nr_fns;

static u32 rd(const struct pci_fn *f, u16 off, unsigned size)
{
	return arch_pci_read(f->bus, f->dev, f->fn, off, size);
}

static void wr(const struct pci_fn *f, u16 off, unsigned size, u32 v)
{
	arch_pci_write(f->bus, f->dev, f->fn, off, size, v);
}

static bool is_virtio(const struct pci_fn *f)
{
	return f->vendor == VIRTIO_VENDOR && f->device >= 0x1000 && f->device <= 0x107f;
}

/* A memory BAR's address (64-bit BARs: with the upper half); *io for I/O BARs. */
static u64 bar_addr(const struct pci_fn *f, unsigned i, bool *is64, bool *io)
{
	u32 lo = rd(f, PCI_BAR0 + 4 * i, 4);

	*io = lo & 1;
	*is64 = !*io && ((lo >> 1) & 3) == 2 && i < 5;
	if (*io)
		return lo & ~3u;
	return (lo & ~0xfu) | (*is64 ? (u64)rd(f, PCI_BAR0 + 4 * i + 4, 4) << 32 : 0);
}

/* Size a memory BAR (decoding off meanwhile); 0 if it is not implemented. */
static u64 bar_size(const struct pci_fn *f, unsigned i, bool is64)
{
	u16 cmd = rd(f, PCI_COMMAND, 2);
	u16 reg = PCI_BAR0 + 4 * i;
	u32 lo = rd(f, reg, 4), hi = 0, mlo, mhi = 0xffffffff;
	u64 mask;

	wr(f, PCI_COMMAND, 2, cmd & ~(CMD_MEMORY | 1));
	wr(f, reg, 4, 0xffffffff);
	mlo = rd(f, reg, 4);
	wr(f, reg, 4, lo);
	if (is64) {
		hi = rd(f, reg + 4, 4);
		wr(f, reg + 4, 4, 0xffffffff);
		mhi = rd(f, reg + 4, 4);
		wr(f, reg + 4, 4, hi);
	}
	wr(f, PCI_COMMAND, 2, cmd);
	if (!(mlo & ~0xfu) && (!is64 || !mhi))
		return 0;		/* not implemented */
	mask = (u64)mhi << 32 | (mlo & ~0xfu);
	return ~mask + 1;
}

/* Address ranges of the BARs already assigned, for the allocator to avoid. */
#define MAX_USED 64
static struct { u64 base, end; } used[MAX_USED];
static unsigned nr_used;
static bool used_known, assign_all;
static u64 win_next, win_end;

static void add_used(u64 base, u64 size)
{
	if (nr_used < MAX_USED) {
		used[nr_used].base = base;
		used[nr_used].end = base + size;
		nr_used++;
	}
}

static void collect_used(void)
{
	used_known = true;
	for (unsigned k = 0; k < nr_fns; k++) {
		const struct pci_fn *f = &fns[k];

		if (assign_all && is_virtio(f))
			continue;
		for (unsigned i = 0; i < 6; i++) {
			bool is64, io;
			u64 a = bar_addr(f, i, &is64, &io);

			if (!io && a)
				add_used(a, bar_size(f, i, is64));
			i += is64;
		}
	}
}

static u64 window_alloc(u64 size)
{
	u64 a;

	if (size < 4096)
		size = 4096;
	a = ALIGN_UP(win_next, size);
again:
	for (unsigned i = 0; i < nr_used; i++) {
		if (a < used[i].end && used[i].base < a + size) {
			a = ALIGN_UP(used[i].end, size);
			goto again;
		}
	}
	if (a + size > win_end || a + size < a)
		return 0;
	win_next = a + size;
	add_used(a, size);
	return a;
}

/*
 * Whether memory BAR i gets an address from the window: every one with virtio_pci.assign=all,
 * an unassigned one, and one this guest cannot map where it is (AArch64: vmmkit's 64-bit BARs
 * at 512 GiB, beyond the identity map's Device gigabyte), moved as firmware would move it.
 */
static bool bar_needs_assigning(const struct pci_fn *f, unsigned i)
{
	bool is64, io;
	u64 a = bar_addr(f, i, &is64, &io);

	if (assign_all || !a)
		return true;
	return !io && !arch_map_mmio(a, bar_size(f, i, is64));
}

/* The BAR's address, assigning one if it has none (or one out of reach). 0 on failure. */
static u64 bar_resolve_for(const char *test, const struct pci_fn *f, const char *where,
			   unsigned i)
{
	bool is64, io;
	u64 a = bar_addr(f, i, &is64, &io), size;

	if (io) {
		report_fail(test, "%s: bar %u is an I/O BAR (not supported)", where, i);
		return 0;
	}
	if (!bar_needs_assigning(f, i))
		return a;
	if (a && !assign_all)
		info(test, "%s: bar %u at 0x%llx is beyond this guest's map", where, i,
		     (unsigned long long)a);
	if (!used_known)
		collect_used();
	size = bar_size(f, i, is64);
	a = size ? window_alloc(size) : 0;
	if (!a) {
		report_fail(test, "%s: no room for bar %u (%llu bytes) in the window",
			    where, i, (unsigned long long)size);
		return 0;
	}
	wr(f, PCI_BAR0 + 4 * i, 4, (u32)a);
	if (is64)
		wr(f, PCI_BAR0 + 4 * i + 4, 4, (u32)(a >> 32));
	info(test, "%s: bar %u assigned 0x%llx (%llu KiB)", where, i,
	     (unsigned long long)a, (unsigned long long)size >> 10);
	return a;
}

static u64 bar_resolve(const struct pci_fn *f, const char *where, unsigned i)
{
	return bar_resolve_for("virtio", f, where, i);
}

static void probe(const struct pci_fn *f)
{
	struct cap {
		u8 bar;
		u32 offset, length, mult;
		bool found;
	} caps[5] = { 0 };
	u64 bars[6] = { 0 }, where_addr[5] = { 0 };
	char where[40];
	u32 type;
	u16 cmd;
	struct virtio_dev *d;

	snprintf(where, sizeof(where), "pci %02x:%02x.%u", f->bus, f->dev, f->fn);
	type = f->device >= 0x1040 ? f->device - 0x1040u : rd(f, PCI_SUBSYSTEM_ID, 2);
	if ((rd(f, PCI_HEADER_TYPE, 1) & 0x7f) != 0)
		return;
	if (rd(f, PCI_STATUS, 2) & STATUS_CAP_LIST) {
		u8 p = rd(f, PCI_CAP_PTR, 1) & 0xfc;

		for (unsigned n = 0; p >= 0x40 && n < 48; n++) {
			if (rd(f, p, 1) == PCI_CAP_VENDOR) {
				u8 t = rd(f, p + CAP_CFG_TYPE, 1);
				u8 bar = rd(f, p + CAP_BAR, 1);

				if (t >= CFG_COMMON && t <= CFG_DEVICE && bar < 6 &&
				    !caps[t].found) {
					caps[t].found = true;
					caps[t].bar = bar;
					caps[t].offset = rd(f, p + CAP_OFFSET, 4);
					caps[t].length = rd(f, p + CAP_LENGTH, 4);
					if (t == CFG_NOTIFY)
						caps[t].mult = rd(f, p + CAP_NOTIFY_MULT, 4);
				}
			}
			p = rd(f, p + 1, 1) & 0xfc;
		}
	}
	if (!caps[CFG_COMMON].found || !caps[CFG_NOTIFY].found) {
		info("virtio", "%s %s: no modern (virtio 1.x) capabilities, not used", where,
		     virtio_type_name(type));
		return;
	}

	/* Decoding off while BARs may move; then memory, bus mastering, no INTx. */
	cmd = rd(f, PCI_COMMAND, 2);
	for (unsigned t = CFG_COMMON; t <= CFG_DEVICE; t++) {
		if (caps[t].found && bar_needs_assigning(f, caps[t].bar))
			wr(f, PCI_COMMAND, 2, cmd & ~(CMD_MEMORY | 1));
	}
	for (unsigned t = CFG_COMMON; t <= CFG_DEVICE; t++) {
		struct cap *c = &caps[t];

		if (!c->found)
			continue;
		if (!bars[c->bar]) {
			bars[c->bar] = bar_resolve(f, where, c->bar);
			if (!bars[c->bar])
				return;
		}
		where_addr[t] = bars[c->bar] + c->offset;
		if (!arch_map_mmio(where_addr[t], c->length ? c->length : 1)) {
			report_fail("virtio", "%s: cannot map 0x%llx", where,
				    (unsigned long long)where_addr[t]);
			return;
		}
	}
	wr(f, PCI_COMMAND, 2, (cmd & ~1) | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE);
	info("virtio", "%s: common cfg 0x%llx (bar %u), notify 0x%llx x %u, device cfg 0x%llx",
	     where, (unsigned long long)where_addr[CFG_COMMON], caps[CFG_COMMON].bar,
	     (unsigned long long)where_addr[CFG_NOTIFY], caps[CFG_NOTIFY].mult,
	     (unsigned long long)where_addr[CFG_DEVICE]);

	d = virtio_register(&pci_transport, type, where);
	if (!d)
		return;
	d->common = where_addr[CFG_COMMON];
	d->notify_base = where_addr[CFG_NOTIFY];
	d->notify_mult = caps[CFG_NOTIFY].mult;
	d->isr = where_addr[CFG_ISR];
	d->device_cfg = where_addr[CFG_DEVICE];
	d->device_cfg_len = caps[CFG_DEVICE].found ? caps[CFG_DEVICE].length : 0;
}

static bool parse_window(const char *cmdline)
{
	size_t len;
	const char *v = cmdline_value(cmdline, "virtio_pci.window", 0, &len);
	const char *p = v, *end = v + len;
	u64 size, base;

	if (!v)
		return false;
	if (!cmdline_parse_u64(&p, end, &size, true) || p == end || *p++ != '@' ||
	    !cmdline_parse_u64(&p, end, &base, true) || p != end || !size) {
		report_fail("virtio", "cannot parse 'virtio_pci.window=%.*s'", (int)len, v);
		return false;
	}
	win_next = base;
	win_end = base + size;
	return true;
}

/* Enumerate one bus into fns[] and set up the BAR window, once. */
static void pci_scan_bus(u8 bus, const char *cmdline)
{
	static bool scanned;
	size_t len;
	const char *v = cmdline_value(cmdline, "virtio_pci.assign", 0, &len);

	if (scanned)
		return;
	scanned = true;
	assign_all = v && len == 3 && !strncmp(v, "all", 3);
	if (!parse_window(cmdline)) {
		u64 base, size;

		arch_pci_mem_window(&base, &size);
		win_next = base;
		win_end = base + size;
	}

	for (u8 dev = 0; dev < 32; dev++) {
		for (u8 fn = 0; fn < 8; fn++) {
			u32 id = arch_pci_read(bus, dev, fn, PCI_VENDOR_ID, 4);

			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
				if (!fn)
					break;
				continue;
			}
			if (nr_fns < MAX_FNS)
				fns[nr_fns++] = (struct pci_fn){ bus, dev, fn, id & 0xffff, id >> 16 };
			if (!fn && !(arch_pci_read(bus, dev, 0, PCI_HEADER_TYPE, 1) & 0x80))
				break;
		}
	}
}

void virtio_pci_scan(u8 bus, const char *cmdline)
{
	pci_scan_bus(bus, cmdline);
	for (unsigned k = 0; k < nr_fns; k++)
		if (is_virtio(&fns[k]))
			probe(&fns[k]);
}

bool pci_find(u16 vendor, u16 device, unsigned index, const char *cmdline, u8 *bus, u8 *dev,
	      u8 *fn)
{
	pci_scan_bus(0, cmdline);
	for (unsigned k = 0; k < nr_fns; k++) {
		if (fns[k].vendor != vendor || fns[k].device != device || index--)
			continue;
		*bus = fns[k].bus;
		*dev = fns[k].dev;
		*fn = fns[k].fn;
		return true;
	}
	return false;
}

u64 pci_memory_bar(const char *test, u8 bus, u8 dev, u8 fn, unsigned bar, u64 *size)
{
	struct pci_fn f = { bus, dev, fn, 0, 0 };
	char where[40];
	bool is64, io;
	u64 a;

	snprintf(where, sizeof(where), "pci %02x:%02x.%u", bus, dev, fn);
	a = bar_resolve_for(test, &f, where, bar);
	bar_addr(&f, bar, &is64, &io);
	*size = a ? bar_size(&f, bar, is64) : 0;
	return a;
}
