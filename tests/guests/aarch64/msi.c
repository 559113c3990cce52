/*
 * AArch64 MSIs through the GICv3 ITS of the device tree (Arm GIC architecture
 * specification IHI 0069, chapters 5 and 12), as Linux's irq-gic-v3-its.c,
 * cut down to one device, one event, one collection:
 *
 *   - LPIs on this CPU's redistributor: a configuration table for 14 INTID
 *     bits (GICR_PROPBASER; LPI 8192 enabled at priority 0xa0) and a zeroed
 *     pending table (GICR_PENDBASER), then GICR_CTLR.EnableLPIs;
 *   - the ITS: a flat table for each GITS_BASER<n> of type Devices or
 *     Collections (one page of the size the ITS accepts), a 4 KiB command
 *     queue (GITS_CBASER), GITS_CTLR.Enabled;
 *   - commands MAPD (the PCI requester id as DeviceID, as the host bridge's
 *     msi-map says for QEMU virt and vmmkit, with an ITT of two events),
 *     MAPC (collection 0 -> this redistributor), MAPTI (event 0 -> LPI
 *     8192), INVALL and SYNC, each waited for (GITS_CREADR);
 *   - the MSI: address GITS_TRANSLATER (ITS + 0x10040), data = event 0.
 *
 * 64-bit registers are written as two 32-bit halves, low first (allowed for
 * the ITS and redistributor registers used here), with the single-instruction
 * accessors of arch_io.h (KVM needs a valid syndrome). Tables are static and
 * 64 KiB aligned; done once per boot.
 */
#include "arch_io.h"
#include "fdt.h"
#include "gic.h"
#include "msi.h"
#include "printf.h"
#include "string.h"

#define GICD_TYPER		0x0004
#define GICD_TYPER_LPIS		(1u << 17)
#define GICR_CTLR		0x0000
#define GICR_CTLR_ENABLE_LPIS	(1u << 0)
#define GICR_TYPER		0x0008
#define GICR_PROPBASER		0x0070
#define GICR_PENDBASER		0x0078
#define GITS_CTLR		0x0000
#define GITS_CTLR_ENABLED	(1u << 0)
#define GITS_CTLR_QUIESCENT	(1u << 31)
#define GITS_TYPER		0x0008
#define GITS_CBASER		0x0080
#define GITS_CWRITER		0x0088
#define GITS_CREADR		0x0090
#define GITS_BASER		0x0100
#define GITS_TRANSLATER		0x10040

/* Table attributes: inner write-back read/write-allocate, inner shareable. */
#define ATTR_CACHE		(7ull << 59)	/* GITS_BASER / GITS_CBASER InnerCache */
#define ATTR_SHARE		(1ull << 10)
#define RD_CACHE		(7ull << 7)	/* GICR_PROPBASER / GICR_PENDBASER InnerCache */
#define BASER_VALID		(1ull << 63)
#define PENDBASER_PTZ		(1ull << 62)

#define LPI_BASE		8192
#define LPI_ID_BITS		14
#define MSI_LPI			LPI_BASE
#define MSI_EVENT		0
#define ITS_PAGE		0x10000

enum { CMD_SYNC = 0x05, CMD_MAPD = 0x08, CMD_MAPC = 0x09, CMD_MAPTI = 0x0a, CMD_INVALL = 0x0d };

static u8 lpi_config[(1u << LPI_ID_BITS) - LPI_BASE] __noinit __attribute__((aligned(4096)));
static u8 lpi_pending[ITS_PAGE] __noinit __attribute__((aligned(ITS_PAGE)));
static u8 its_tables[2][ITS_PAGE] __noinit __attribute__((aligned(ITS_PAGE)));
static u64 its_cmds[4096 / 8] __noinit __attribute__((aligned(ITS_PAGE)));
static u8 its_itt[256] __noinit __attribute__((aligned(256)));

static bool its_ready;
static u64 its, rd;
static u32 mapped_device = ~0u;
static void (*msi_handler)(void);

static u64 read64(u64 a) { return mmio_read32(a) | (u64)mmio_read32(a + 4) << 32; }

static void write64(u64 a, u64 v)
{
	mmio_write32(a, (u32)v);
	mmio_write32(a + 4, (u32)(v >> 32));
}

static void on_lpi(u32 intid)
{
	if (intid == MSI_LPI && msi_handler)
		msi_handler();
}

/* One command into the queue; waits until the ITS has consumed it. NULL, or why not. */
static const char *its_command(u64 dw0, u64 dw1, u64 dw2)
{
	u64 writer = read64(its + GITS_CWRITER) & 0xfffe0, *cmd = &its_cmds[writer / 8];

	cmd[0] = dw0;
	cmd[1] = dw1;
	cmd[2] = dw2;
	cmd[3] = 0;
	dma_wmb();
	writer = (writer + 32) % sizeof(its_cmds);
	write64(its + GITS_CWRITER, writer);
	for (u32 i = 0; (read64(its + GITS_CREADR) & 0xfffe0) != writer; i++) {
		if (read64(its + GITS_CREADR) & 1)
			return "the ITS stalled on a command (GITS_CREADR.Stalled)";
		if (i > 10000000)
			return "the ITS did not consume a command";
	}
	return NULL;
}

/* Give every GITS_BASER of type Devices (1) or Collections (4) one page of a table. */
static const char *its_baser_setup(void)
{
	unsigned used = 0;

	for (unsigned n = 0; n < 8; n++) {
		u64 reg = its + GITS_BASER + 8 * n, val = read64(reg), type = (val >> 56) & 7, back;
		unsigned s;

		if (type != 1 && type != 4)
			continue;
		if (used == 2)
			return "more than two ITS tables to set up";
		memset(its_tables[used], 0, ITS_PAGE);
		/* the largest page size the ITS keeps (KVM: 64 KiB only) */
		for (s = 0; s < 3; s++) {
			u64 ps = s == 0 ? 2 : s == 1 ? 1 : 0;

			val = BASER_VALID | ATTR_CACHE | (val & (0x1full << 48)) | type << 56 |
			      dma_addr(its_tables[used]) | ATTR_SHARE | ps << 8;	/* Size 0: one page */
			write64(reg, val);
			back = read64(reg);
			if (((back >> 8) & 3) == ps)
				break;
		}
		if (s == 3 || !(back & BASER_VALID))
			return "no GITS_BASER page size sticks";
		used++;
	}
	return NULL;
}

static const char *its_init(void)
{
	u64 typer, rd_typer;
	const char *why;
	u32 procnum;

	if (!plat.gic_its)
		return "no GICv3 ITS in the device tree";
	if (!(mmio_read32(plat.gic_dist + GICD_TYPER) & GICD_TYPER_LPIS))
		return "the distributor does not support LPIs (GICD_TYPER.LPIS)";
	why = gic_init(&rd);
	if (why)
		return why;
	its = plat.gic_its;

	/* LPIs on this redistributor */
	memset(lpi_config, 0, sizeof(lpi_config));
	memset(lpi_pending, 0, sizeof(lpi_pending));
	lpi_config[MSI_LPI - LPI_BASE] = 0xa0 | 1;		/* priority 0xa0, enabled */
	dma_wmb();
	if (mmio_read32(rd + GICR_CTLR) & GICR_CTLR_ENABLE_LPIS)
		return "LPIs are already enabled on this redistributor";
	write64(rd + GICR_PROPBASER, dma_addr(lpi_config) | ATTR_SHARE | RD_CACHE | (LPI_ID_BITS - 1));
	write64(rd + GICR_PENDBASER, dma_addr(lpi_pending) | ATTR_SHARE | RD_CACHE | PENDBASER_PTZ);
	mmio_write32(rd + GICR_CTLR, mmio_read32(rd + GICR_CTLR) | GICR_CTLR_ENABLE_LPIS);

	/* the ITS: off, tables, command queue, on */
	mmio_write32(its + GITS_CTLR, 0);
	for (u32 i = 0; !(mmio_read32(its + GITS_CTLR) & GITS_CTLR_QUIESCENT); i++)
		if (i > 1000000)
			return "the ITS never became quiescent";
	why = its_baser_setup();
	if (why)
		return why;
	memset(its_cmds, 0, sizeof(its_cmds));
	write64(its + GITS_CBASER, BASER_VALID | ATTR_CACHE | dma_addr(its_cmds) | ATTR_SHARE);
	write64(its + GITS_CWRITER, 0);
	mmio_write32(its + GITS_CTLR, GITS_CTLR_ENABLED);

	/* collection 0 -> this redistributor (by address if GITS_TYPER.PTA, else by number) */
	typer = read64(its + GITS_TYPER);
	rd_typer = read64(rd + GICR_TYPER);
	procnum = (u32)(rd_typer >> 8) & 0xffff;
	why = its_command(CMD_MAPC, 0, BASER_VALID |
			  ((typer >> 19) & 1 ? (rd & 0xfffffffff0000ull) : (u64)procnum << 16));
	if (why)
		return why;
	gic_lpi_handler = on_lpi;
	its_ready = true;
	return NULL;
}

const char *arch_msi_route(u16 requester_id, void (*handler)(void), u64 *addr, u32 *data,
			   char *desc, unsigned desc_size)
{
	const char *why;
	u64 rdbase;

	if (!its_ready) {
		why = its_init();
		if (why)
			return why;
	}
	if (mapped_device != requester_id) {
		memset(its_itt, 0, sizeof(its_itt));
		dma_wmb();
		/* MAPD: DeviceID, 2 events (Size = bits - 1 = 0 means 1 bit), ITT, valid */
		why = its_command(CMD_MAPD | (u64)requester_id << 32, 0,
				  BASER_VALID | dma_addr(its_itt));
		if (!why)
			why = its_command(CMD_MAPTI | (u64)requester_id << 32,
					  MSI_EVENT | (u64)MSI_LPI << 32, 0);
		if (!why)
			why = its_command(CMD_INVALL, 0, 0);
		rdbase = (read64(its + GITS_TYPER) >> 19) & 1 ? (rd & 0xfffffffff0000ull)
							     : ((read64(rd + GICR_TYPER) >> 8) & 0xffff) << 16;
		if (!why)
			why = its_command(CMD_SYNC, 0, rdbase);
		if (why)
			return why;
		mapped_device = requester_id;
	}
	msi_handler = handler;
	*addr = its + GITS_TRANSLATER;
	*data = MSI_EVENT;
	snprintf(desc, desc_size, "its lpi %u", MSI_LPI);
	return NULL;
}

void arch_msi_release(void) { msi_handler = NULL; }
void arch_irqs_on(void) { __asm__ __volatile__("msr daifclr, #2; isb" ::: "memory"); }
void arch_irqs_off(void) { __asm__ __volatile__("msr daifset, #2; isb" ::: "memory"); }
