/*
 * test=edu: QEMU's educational PCI device (vendor 0x1234, device 0x11e8;
 * qemu/qemu docs/specs/edu.rst and hw/misc/edu.c), emulated by QEMU or
 * passed through with VFIO. BAR 0 (1 MiB, 32-bit accesses) holds:
 *
 *   0x00 identification 0xRRrr00ed (major, minor)   0x04 liveness: reads ~written
 *   0x08 factorial: write n, read n! (u32)          0x20 status: 0x01 computing,
 *   0x24 interrupt status                                0x80 interrupt when done
 *   0x60 raise interrupt (ORed into 0x24)           0x64 acknowledge (cleared from 0x24)
 *   0x80 DMA source, 0x88 destination, 0x90 count, 0x98 command: 0x01 run,
 *        0x02 edu -> RAM (else RAM -> edu), 0x04 interrupt 0x100 when done;
 *        the device's buffer is [0x40000, 0x41000) of its own address space;
 *        QEMU 7.2's range check (edu_check_range, fixed later) wants a
 *        transfer to end strictly before 0x41000 and aborts QEMU otherwise,
 *        so the guest leaves the buffer's last 256 bytes alone
 *
 * and an MSI capability (one vector, 64-bit address, no masking). Its DMA
 * addresses are masked to dma_mask bits (28 by default), so the guest's
 * buffers must lie below 256 MiB (x86-64: they are in the image at 1 MiB)
 * unless the device is given a wider mask (AArch64, RAM at 1 GiB:
 * -device edu,dma_mask=...).
 *
 * Stable lines (identical for every correct VMM and device):
 *   ok edu id (0x010000ed, version 1.0)
 *   ok edu liveness (4 values read back inverted)
 *   ok edu factorial (0! = 1, 1! = 1, 5! = 120, 12! = 479001600)
 *   ok edu dma (3840 bytes RAM -> edu -> RAM at offset 0, 128 bytes at offset 0xe00)
 *   ok edu irq (msi: 3 interrupts, status 0x4000 raised, 0x1 factorial, 0x100 dma, each acknowledged)
 *   ok edu
 * or, where the architecture cannot route an MSI, an irq line that says the
 * interrupts were seen in the status register only.
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "msi.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "timeout.h"
#include "virtio.h"
#include "virtio_pci.h"

#define EDU_VENDOR		0x1234
#define EDU_DEVICE		0x11e8

#define EDU_ID			0x00
#define EDU_LIVENESS		0x04
#define EDU_FACTORIAL		0x08
#define EDU_STATUS		0x20
#define EDU_IRQ_STATUS		0x24
#define EDU_IRQ_RAISE		0x60
#define EDU_IRQ_ACK		0x64
#define EDU_DMA_SRC		0x80
#define EDU_DMA_DST		0x88
#define EDU_DMA_COUNT		0x90
#define EDU_DMA_CMD		0x98

#define STATUS_COMPUTING	0x01
#define STATUS_IRQ_FACT		0x80
#define DMA_RUN			0x01
#define DMA_TO_RAM		0x02
#define DMA_IRQ			0x04
#define IRQ_FACT		0x001
#define IRQ_DMA			0x100
#define IRQ_RAISED		0x4000	/* the value test=edu raises through 0x60 */
#define EDU_BUF			0x40000
#define EDU_BUF_SIZE		4096
#define DMA_LONG		0xf00	/* see above: not all 4096 bytes */
#define DMA_PART		0xe00	/* offset of the second, short transfer */
#define DMA_PART_LEN		128

#define PCI_COMMAND		0x04
#define PCI_STATUS		0x06
#define PCI_CAP_PTR		0x34
#define PCI_INT_PIN		0x3d
#define CMD_MEMORY		0x0002
#define CMD_MASTER		0x0004
#define CMD_INTX_DISABLE	0x0400
#define STATUS_CAP_LIST		0x0010
#define CAP_MSI			0x05
#define MSI_CTRL		2
#define MSI_ENABLE		0x0001
#define MSI_MME			0x0070
#define MSI_64BIT		0x0080

#define WAIT_SECONDS		5

static u8 bus, dev, fn;
static u64 bar;
static volatile unsigned irqs;

static u32 rd(unsigned off) { return mmio_read32(bar + off); }
static void wr(unsigned off, u32 v) { mmio_write32(bar + off, v); }
static u32 cfg_rd(u16 off, unsigned size) { return arch_pci_read(bus, dev, fn, off, size); }
static void cfg_wr(u16 off, unsigned size, u32 v) { arch_pci_write(bus, dev, fn, off, size, v); }

/* Poll until (register & mask) == 0, at most WAIT_SECONDS. */
static bool wait_clear(unsigned off, u32 mask)
{
	struct timeout t;

	timeout_start(&t, WAIT_SECONDS);
	while (rd(off) & mask) {
		if (timeout_expired(&t))
			return false;
		arch_cpu_relax();
	}
	return true;
}

static void check_id(void)
{
	u32 id = rd(EDU_ID);

	if ((id & 0xffff) != 0x00ed)
		report_fail("edu id", "identification register reads 0x%08x, not 0xRRrr00ed", id);
	else
		report_ok("edu id", "(0x%08x, version %u.%u)", id, id >> 24, (id >> 16) & 0xff);
}

static void check_liveness(void)
{
	static const u32 values[] = { 0, 0xffffffff, 0x12345678, 0xa5a55a5a };

	for (unsigned i = 0; i < ARRAY_SIZE(values); i++) {
		u32 got;

		wr(EDU_LIVENESS, values[i]);
		got = rd(EDU_LIVENESS);
		if (got != ~values[i]) {
			report_fail("edu liveness", "wrote 0x%08x, read 0x%08x (want 0x%08x)",
				    values[i], got, ~values[i]);
			return;
		}
	}
	report_ok("edu liveness", "(%u values read back inverted)", (unsigned)ARRAY_SIZE(values));
}

static u32 factorial(u32 n)
{
	u32 r = 1;

	while (n > 1)
		r *= n--;
	return r;
}

/* n! from the device; false (after a FAIL line) if it stays busy. */
static bool device_factorial(u32 n, u32 *result)
{
	if (!wait_clear(EDU_STATUS, STATUS_COMPUTING)) {
		report_fail("edu factorial", "busy before %u! (status 0x%x)", n, rd(EDU_STATUS));
		return false;
	}
	wr(EDU_FACTORIAL, n);
	if (!wait_clear(EDU_STATUS, STATUS_COMPUTING)) {
		report_fail("edu factorial", "%u! not done in %u s (status 0x%x)", n, WAIT_SECONDS,
			    rd(EDU_STATUS));
		return false;
	}
	*result = rd(EDU_FACTORIAL);
	return true;
}

static void check_factorial(void)
{
	static const u32 ns[] = { 0, 1, 5, 12 };
	char detail[128];
	unsigned len = 0;

	for (unsigned i = 0; i < ARRAY_SIZE(ns); i++) {
		u32 got;

		if (!device_factorial(ns[i], &got))
			return;
		if (got != factorial(ns[i])) {
			report_fail("edu factorial", "%u! = %u, the device says %u", ns[i],
				    factorial(ns[i]), got);
			return;
		}
		len += snprintf(detail + len, sizeof(detail) - len, "%s%u! = %u", i ? ", " : "",
				ns[i], got);
	}
	report_ok("edu factorial", "(%s)", detail);
}

/* One DMA transfer; flags: DMA_TO_RAM, DMA_IRQ. False (after a FAIL line) on a timeout. */
static bool dma(u64 src, u64 dst, u32 count, u32 flags)
{
	dma_mb();
	wr(EDU_DMA_SRC, (u32)src);
	wr(EDU_DMA_DST, (u32)dst);
	wr(EDU_DMA_COUNT, count);
	wr(EDU_DMA_CMD, DMA_RUN | flags);
	if (!wait_clear(EDU_DMA_CMD, DMA_RUN)) {
		report_fail("edu dma", "transfer 0x%llx -> 0x%llx (%u bytes) not done in %u s",
			    (unsigned long long)src, (unsigned long long)dst, count, WAIT_SECONDS);
		return false;
	}
	dma_mb();
	return true;
}

static u8 *dma_src, *dma_dst;

static void check_dma(void)
{
	u32 *src = (u32 *)dma_src, *dst = (u32 *)dma_dst;
	u64 hi = dma_addr(dma_dst) + EDU_BUF_SIZE;

	info("edu", "dma buffers at 0x%llx and 0x%llx", (unsigned long long)dma_addr(dma_src),
	     (unsigned long long)dma_addr(dma_dst));
	if (hi > 0xffffffffull) {
		report_fail("edu dma", "buffers above 4 GiB (the guest writes 32-bit addresses)");
		return;
	}
	for (unsigned i = 0; i < EDU_BUF_SIZE / 4; i++) {
		src[i] = (i * 0x9e3779b1u) ^ 0xed000000u;
		dst[i] = 0;
	}
	if (!dma(dma_addr(dma_src), EDU_BUF, DMA_LONG, 0) ||
	    !dma(EDU_BUF, dma_addr(dma_dst), DMA_LONG, DMA_TO_RAM))
		return;
	if (memcmp(dma_src, dma_dst, DMA_LONG) || dst[DMA_LONG / 4] != 0) {
		unsigned i = 0;

		while (i < DMA_LONG / 4 && src[i] == dst[i])
			i++;
		report_fail("edu dma", "word %u came back 0x%08x, sent 0x%08x%s", i, dst[i],
			    i < DMA_LONG / 4 ? src[i] : 0,
			    hi > (1u << 28) ? " (edu masks DMA addresses to 28 bits by default: "
					      "is the device's dma_mask wide enough?)" : "");
		return;
	}
	/* A part: RAM to the middle of the device's buffer, back to fresh RAM. */
	for (unsigned i = 0; i < DMA_PART_LEN / 4; i++)
		src[i] = ~src[i];
	memset(dma_dst, 0, DMA_PART_LEN + 4);
	if (!dma(dma_addr(dma_src), EDU_BUF + DMA_PART, DMA_PART_LEN, 0) ||
	    !dma(EDU_BUF + DMA_PART, dma_addr(dma_dst), DMA_PART_LEN, DMA_TO_RAM))
		return;
	if (memcmp(dma_src, dma_dst, DMA_PART_LEN) || dst[DMA_PART_LEN / 4] != 0) {
		report_fail("edu dma", "%u bytes at offset 0x%x did not come back as sent",
			    DMA_PART_LEN, DMA_PART);
		return;
	}
	report_ok("edu dma", "(%u bytes RAM -> edu -> RAM at offset 0, %u bytes at offset 0x%x)",
		  DMA_LONG, DMA_PART_LEN, DMA_PART);
}

/* -- interrupts ------------------------------------------------------------ */

static u8 msi_cap;
static bool msi_on;

static void on_msi(void) { irqs++; }

static u8 find_cap(u8 id)
{
	u8 p;

	if (!(cfg_rd(PCI_STATUS, 2) & STATUS_CAP_LIST))
		return 0;
	p = cfg_rd(PCI_CAP_PTR, 1) & 0xfc;
	for (unsigned n = 0; p >= 0x40 && n < 48; n++) {
		if (cfg_rd(p, 1) == id)
			return p;
		p = cfg_rd(p + 1, 1) & 0xfc;
	}
	return 0;
}

/* MSI on, one vector, to the boot CPU. NULL, or why not (then INTx stays off too). */
static const char *msi_enable(char *desc, unsigned desc_size)
{
	const char *why;
	u64 addr;
	u32 data;
	u16 ctrl;

	msi_cap = find_cap(CAP_MSI);
	if (!msi_cap)
		return "the device has no MSI capability";
	why = arch_msi_route((u16)(bus << 8 | dev << 3 | fn), on_msi, &addr, &data, desc, desc_size);
	if (why)
		return why;
	ctrl = cfg_rd(msi_cap + MSI_CTRL, 2);
	cfg_wr(msi_cap + 4, 4, (u32)addr);
	if (ctrl & MSI_64BIT) {
		cfg_wr(msi_cap + 8, 4, (u32)(addr >> 32));
		cfg_wr(msi_cap + 12, 2, data);
	} else {
		cfg_wr(msi_cap + 8, 2, data);
	}
	cfg_wr(msi_cap + MSI_CTRL, 2, (ctrl & ~MSI_MME) | MSI_ENABLE);
	msi_on = true;
	return NULL;
}

static void msi_disable(void)
{
	if (!msi_on)
		return;
	cfg_wr(msi_cap + MSI_CTRL, 2, cfg_rd(msi_cap + MSI_CTRL, 2) & ~MSI_ENABLE);
	arch_msi_release();
	msi_on = false;
}

/*
 * Wait for the interrupt status to show `bit` (and, with MSI, for one more
 * interrupt), then acknowledge it and check it cleared. False after a FAIL.
 */
static bool expect_irq(const char *cause, u32 bit, unsigned want_irqs)
{
	struct timeout t;
	u32 st;

	timeout_start(&t, WAIT_SECONDS);
	if (msi_on)
		arch_irqs_on();
	while (!((rd(EDU_IRQ_STATUS) & bit) && (!msi_on || irqs >= want_irqs)) &&
	       !timeout_expired(&t))
		arch_cpu_relax();
	if (msi_on)
		arch_irqs_off();
	st = rd(EDU_IRQ_STATUS);
	if (st != bit || (msi_on && irqs != want_irqs)) {
		report_fail("edu irq", "%s: interrupt status 0x%x (want 0x%x), %u MSIs (want %u)",
			    cause, st, bit, irqs, msi_on ? want_irqs : 0);
		return false;
	}
	wr(EDU_IRQ_ACK, bit);
	st = rd(EDU_IRQ_STATUS);
	if (st) {
		report_fail("edu irq", "%s: status 0x%x after acknowledging 0x%x", cause, st, bit);
		return false;
	}
	return true;
}

static void check_irq(void)
{
	char desc[32], detail[160];
	const char *no_msi;
	u32 r;

	if (rd(EDU_IRQ_STATUS)) {
		info("edu", "interrupt status 0x%x at start, acknowledged", rd(EDU_IRQ_STATUS));
		wr(EDU_IRQ_ACK, rd(EDU_IRQ_STATUS));
	}
	irqs = 0;
	no_msi = msi_enable(desc, sizeof(desc));
	if (no_msi)
		info("edu", "no MSI: %s; interrupts seen in the status register only", no_msi);
	else
		info("edu", "msi %s", desc);

	wr(EDU_IRQ_RAISE, IRQ_RAISED);
	if (!expect_irq("raise 0x4000", IRQ_RAISED, 1))
		goto out;

	wr(EDU_STATUS, STATUS_IRQ_FACT);
	if (!device_factorial(6, &r))
		goto out;
	if (r != 720) {
		report_fail("edu irq", "6! with an interrupt = %u", r);
		goto out;
	}
	if (!expect_irq("factorial done", IRQ_FACT, 2))
		goto out;
	wr(EDU_STATUS, 0);

	dma_src[0] ^= 0xff;
	if (!dma(dma_addr(dma_src), EDU_BUF, 64, DMA_IRQ) || !expect_irq("dma done", IRQ_DMA, 3))
		goto out;

	if (no_msi)
		snprintf(detail, sizeof(detail), "no msi, status register only: 0x%x raised, "
			 "0x%x factorial, 0x%x dma, each acknowledged", IRQ_RAISED, IRQ_FACT, IRQ_DMA);
	else
		snprintf(detail, sizeof(detail), "msi: %u interrupts, status 0x%x raised, 0x%x "
			 "factorial, 0x%x dma, each acknowledged", irqs, IRQ_RAISED, IRQ_FACT, IRQ_DMA);
	report_ok("edu irq", "(%s)", detail);
out:
	wr(EDU_STATUS, 0);
	msi_disable();
}

static void run_edu(void)
{
	unsigned fails = report_failures();
	u64 size;
	u16 cmd;

	if (!pci_find(EDU_VENDOR, EDU_DEVICE, 0, boot_info->cmdline, &bus, &dev, &fn)) {
		report_fail("edu", "no edu device (%04x:%04x) on PCI bus 0", EDU_VENDOR, EDU_DEVICE);
		return;
	}
	bar = pci_memory_bar("edu", bus, dev, fn, 0, &size);
	if (!bar)
		return;
	if (size < 0x1000 || !arch_map_mmio(bar, size)) {
		report_fail("edu", "cannot map bar 0 at 0x%llx (%llu bytes)",
			    (unsigned long long)bar, (unsigned long long)size);
		return;
	}
	info("edu", "pci %02x:%02x.%u: bar 0 at 0x%llx (%llu KiB), interrupt pin %u", bus, dev, fn,
	     (unsigned long long)bar, (unsigned long long)size >> 10, cfg_rd(PCI_INT_PIN, 1));
	cmd = cfg_rd(PCI_COMMAND, 2);
	cfg_wr(PCI_COMMAND, 2, (cmd & ~1) | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE);
	if (!dma_src) {
		dma_src = dma_alloc(EDU_BUF_SIZE, 4096);
		dma_dst = dma_alloc(EDU_BUF_SIZE, 4096);
	}

	check_id();
	check_liveness();
	check_factorial();
	if (dma_src && dma_dst)
		check_dma();
	else
		report_fail("edu dma", "no DMA memory left in the pool");
	if (dma_src)
		check_irq();

	/* Leave the device quiet: no bus mastering, INTx off. */
	cfg_wr(PCI_COMMAND, 2, (cmd & ~(1 | CMD_MASTER)) | CMD_MEMORY | CMD_INTX_DISABLE);
	if (report_failures() == fails)
		report_ok("edu", NULL);
}
SELFTEST(edu, run_edu, "QEMU's edu PCI device: id, liveness, factorial, DMA, MSI");
