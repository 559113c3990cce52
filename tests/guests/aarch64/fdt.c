/*
 * A minimal flattened device tree reader: one pass over the structure
 * block, tracking #address-cells/#size-cells per level. Every offset and
 * length comes from the VMM and is bounds-checked against totalsize.
 */
#include "fdt.h"
#include "string.h"

#define FDT_MAGIC	0xd00dfeed
#define FDT_BEGIN_NODE	1
#define FDT_END_NODE	2
#define FDT_PROP	3
#define FDT_NOP		4
#define FDT_END		9
#define MAX_DEPTH	16
#define FDT_MAX_SIZE	(2u << 20)

struct platform plat;

static const u8 *blob;
static u32 size, off_struct, size_struct, off_strings, size_strings;

static u32 be32(const void *p)
{
	const u8 *b = p;

	return (u32)b[0] << 24 | (u32)b[1] << 16 | (u32)b[2] << 8 | b[3];
}

static u64 cells(const u8 *p, u32 n)
{
	u64 v = 0;

	for (u32 i = 0; i < n; i++)
		v = v << 32 | be32(p + 4 * i);
	return v;
}

/* Is `s` (length len, NUL included) a string list containing `want`? */
static bool has_string(const char *s, u32 len, const char *want)
{
	u32 i = 0;

	while (i < len) {
		u32 n = strnlen(s + i, len - i);

		if (n == strlen(want) && !strncmp(s + i, want, n))
			return true;
		i += n + 1;
	}
	return false;
}

static bool starts_with(const char *s, const char *prefix)
{
	return !strncmp(s, prefix, strlen(prefix));
}

struct node {
	char name[48];
	u32 addr_cells, size_cells;	/* for this node's children */
	const u8 *reg;
	u32 reg_len;
	const char *compatible;
	u32 compatible_len;
	const char *device_type;
	u32 irq;			/* SPI number + 32 of the first interrupt, 0 if none */
	const u8 *interrupts;		/* the raw "interrupts" property */
	u32 interrupts_len;
	const u8 *ranges;		/* the raw "ranges" property */
	u32 ranges_len;
	bool is_cpu_parent;
};

static struct node stack[MAX_DEPTH];

static void copy_string(char *dst, u32 dst_size, const char *src, u32 len)
{
	u32 n = strnlen(src, len);

	if (n >= dst_size)
		n = dst_size - 1;
	memcpy(dst, src, n);
	dst[n] = 0;
}

static bool compatible(const struct node *n, const char *want)
{
	return n->compatible && has_string(n->compatible, n->compatible_len, want);
}

/* A node ended: record what it describes. `parent` has the cell sizes. */
static void node_done(const struct node *n, const struct node *parent, int depth,
		      struct bootinfo *bi)
{
	u32 ac = parent->addr_cells, sc = parent->size_cells;
	u32 entry = 4 * (ac + sc);
	u64 base = 0, len = 0;

	if (n->reg && ac <= 2 && sc <= 2 && entry && n->reg_len >= entry) {
		base = cells(n->reg, ac);
		len = cells(n->reg + 4 * ac, sc);
	}
	if (depth == 1 && ((n->device_type && !strcmp(n->device_type, "memory")) ||
			   starts_with(n->name, "memory@"))) {
		for (u32 o = 0; n->reg && entry && o + entry <= n->reg_len && bi->nr_memmap < MEMMAP_MAX; o += entry) {
			struct memmap_entry *e = &bi->memmap[bi->nr_memmap++];

			e->addr = cells(n->reg + o, ac);
			e->size = cells(n->reg + o + 4 * ac, sc);
			e->type = MEM_RAM;
		}
		return;
	}
	if (parent->is_cpu_parent && n->device_type && !strcmp(n->device_type, "cpu")) {
		if (plat.nr_cpus < MAX_CPUS && n->reg && n->reg_len >= 4 * ac && ac <= 2)
			plat.cpu_mpidr[plat.nr_cpus] = cells(n->reg, ac);
		plat.nr_cpus++;
		return;
	}
	if (compatible(n, "arm,pl011") && !plat.uart)
		plat.uart = base;
	else if (compatible(n, "arm,pl031") && !plat.rtc) {
		plat.rtc = base;
		plat.rtc_irq = n->irq;
	}
	else if (compatible(n, "vmmkit,debug-exit"))
		plat.debug_exit = base;
	else if (compatible(n, "arm,gic-v3")) {
		plat.gic_v3 = true;
		plat.gic_dist = base;
		if (n->reg && entry && n->reg_len >= 2 * entry)
			plat.gic_redist = cells(n->reg + entry, ac);
	} else if (compatible(n, "arm,gic-v3-its") && !plat.gic_its) {
		plat.gic_its = base;
	} else if (compatible(n, "arm,armv8-timer")) {
		plat.timer = true;
		if (n->interrupts && n->interrupts_len >= 36 && be32(n->interrupts + 24) == 1)
			plat.timer_virt_intid = be32(n->interrupts + 28) + 16;	/* a PPI */
	}
	else if (compatible(n, "pci-host-ecam-generic") && !plat.pci_ecam && len) {
		/* ranges: child address (3 cells), parent address (ac), size (child's cells) */
		u32 pe = 4 * (3 + ac + n->size_cells);

		plat.pci_ecam = base;
		plat.pci_ecam_size = len;
		for (u32 o = 0; n->ranges && ac <= 2 && n->size_cells <= 2 && o + pe <= n->ranges_len;
		     o += pe) {
			const u8 *r = n->ranges + o;
			u64 pci = cells(r + 4, 2), cpu = cells(r + 12, ac);

			/* the first 32-bit memory space window, identity-mapped */
			if (((be32(r) >> 24) & 3) == 2 && pci == cpu && !plat.pci_mem32) {
				plat.pci_mem32 = cpu;
				plat.pci_mem32_size = cells(r + 12 + 4 * ac, n->size_cells);
			}
		}
	}
	else if (compatible(n, "virtio,mmio") && plat.nr_virtio < FDT_MAX_VIRTIO && len) {
		plat.virtio_base[plat.nr_virtio] = base;
		plat.virtio_size[plat.nr_virtio] = len;
		plat.virtio_irq[plat.nr_virtio] = n->irq;
		plat.nr_virtio++;
	}
}

static void property(struct node *n, int depth, const char *name, const u8 *val, u32 len,
		     struct bootinfo *bi)
{
	const char *sval = (const char *)val;

	if (!strcmp(name, "#address-cells") && len == 4)
		n->addr_cells = be32(val);
	else if (!strcmp(name, "#size-cells") && len == 4)
		n->size_cells = be32(val);
	else if (!strcmp(name, "reg")) {
		n->reg = val;
		n->reg_len = len;
	} else if (!strcmp(name, "compatible")) {
		n->compatible = sval;
		n->compatible_len = len;
	} else if (!strcmp(name, "ranges")) {
		n->ranges = val;
		n->ranges_len = len;
	} else if (!strcmp(name, "device_type") && len)
		n->device_type = sval;
	else if (!strcmp(name, "interrupts")) {
		n->interrupts = val;
		n->interrupts_len = len;
		if (len >= 12 && be32(val) == 0)
			n->irq = be32(val + 4) + 32;
	}

	if (depth == 1 && !strcmp(n->name, "chosen")) {
		if (!strcmp(name, "bootargs") && len)
			copy_string(bi->cmdline, sizeof(bi->cmdline), sval, len);
		else if (!strcmp(name, "stdout-path") && len)
			copy_string(plat.stdout_path, sizeof(plat.stdout_path), sval, len);
		else if (!strcmp(name, "linux,initrd-start") && (len == 4 || len == 8))
			plat.initrd_start = cells(val, len / 4);
		else if (!strcmp(name, "linux,initrd-end") && (len == 4 || len == 8))
			plat.initrd_end = cells(val, len / 4);
	}
	if (depth == 1 && starts_with(n->name, "psci")) {
		if (!strcmp(name, "method") && len)
			plat.psci_smc = !strncmp(sval, "smc", len);
		else if (!strcmp(name, "compatible") && len) {
			plat.psci = true;
			copy_string(plat.psci_compatible, sizeof(plat.psci_compatible), sval, len);
		}
	}
	if (depth == 2 && stack[1].is_cpu_parent && !strcmp(name, "enable-method") && len &&
	    !plat.cpu_enable_method[0])
		copy_string(plat.cpu_enable_method, sizeof(plat.cpu_enable_method), sval, len);
}

const char *fdt_parse(u64 dtb, struct bootinfo *bi)
{
	int depth = -1;
	u32 pos;

	if (!dtb || dtb & 7)
		return "no device tree (x0 is 0 or misaligned)";
	blob = phys(dtb);
	if (be32(blob) != FDT_MAGIC)
		return "no device tree (bad magic at x0)";
	size = be32(blob + 4);
	off_struct = be32(blob + 8);
	off_strings = be32(blob + 12);
	size_strings = be32(blob + 32);
	size_struct = be32(blob + 36);
	if (size < 40 || size > FDT_MAX_SIZE || off_struct > size || size_struct > size - off_struct ||
	    off_strings > size || size_strings > size - off_strings)
		return "device tree header out of bounds";
	plat.fdt_size = size;

	for (pos = 0; pos + 4 <= size_struct;) {
		u32 token = be32(blob + off_struct + pos);

		pos += 4;
		if (token == FDT_BEGIN_NODE) {
			const char *name = (const char *)blob + off_struct + pos;
			u32 n = strnlen(name, size_struct - pos);
			struct node *node;

			if (++depth >= MAX_DEPTH)
				return "device tree nested too deeply";
			node = &stack[depth];
			memset(node, 0, sizeof(*node));
			copy_string(node->name, sizeof(node->name), name, n + 1);
			node->addr_cells = 2;
			node->size_cells = 1;
			node->is_cpu_parent = depth == 1 && !strcmp(node->name, "cpus");
			pos += ALIGN_UP(n + 1, 4);
		} else if (token == FDT_END_NODE) {
			if (depth < 0)
				return "device tree: unbalanced END_NODE";
			if (depth > 0)
				node_done(&stack[depth], &stack[depth - 1], depth, bi);
			depth--;
		} else if (token == FDT_PROP) {
			u32 len, nameoff;

			if (pos + 8 > size_struct || depth < 0)
				return "device tree: truncated property";
			len = be32(blob + off_struct + pos);
			nameoff = be32(blob + off_struct + pos + 4);
			pos += 8;
			if (len > size_struct - pos || nameoff >= size_strings)
				return "device tree: property out of bounds";
			property(&stack[depth], depth,
				 (const char *)blob + off_strings + nameoff,
				 blob + off_struct + pos, len, bi);
			pos += ALIGN_UP(len, 4);
		} else if (token == FDT_NOP) {
			continue;
		} else if (token == FDT_END) {
			return depth == -1 ? NULL : "device tree: END inside a node";
		} else {
			return "device tree: unknown token";
		}
	}
	return "device tree: no END token";
}
