/*
 * test=irq: interrupts through the GICv3 of the device tree, as Linux uses
 * them (Arm GIC architecture specification IHI 0069, the generic timer of
 * the Arm ARM D11). Three sources, each must arrive within its time:
 *
 *   gic sgi    an SGI (INTID 1) the boot CPU sends itself (ICC_SGI1R_EL1)
 *   timer      the virtual timer (its PPI from the timer node), 10 ms ahead
 *   gic spi    the PL031's match interrupt (its SPI from the pl031 node),
 *              armed for the next second: a device's level line
 *
 * Only the boot CPU takes interrupts. irq_dispatch() is called by the IRQ
 * vector (entry.S); a VMM without interrupts fails the three checks by
 * timeout, which is why the test is not in the default set.
 */
#include "arch.h"
#include "arch_io.h"
#include "fdt.h"
#include "gic.h"
#include "printf.h"
#include "report.h"
#include "test.h"

/* Distributor (GICD_*) and redistributor (GICR_*, RD_base and SGI_base frames) registers. */
#define GICD_CTLR		0x0000
#define GICD_CTLR_RWP		(1u << 31)
#define GICD_CTLR_ARE		(1u << 4)
#define GICD_CTLR_GRP1		(1u << 1)
#define GICD_CTLR_GRP0		(1u << 0)
#define GICD_IGROUPR		0x0080
#define GICD_ISENABLER		0x0100
#define GICD_ICENABLER		0x0180
#define GICD_IPRIORITYR		0x0400
#define GICD_ICFGR		0x0c00
#define GICD_IROUTER		0x6000
#define GICR_FRAME		0x20000		/* RD_base + SGI_base */
#define GICR_TYPER		0x0008
#define GICR_TYPER_LAST		(1u << 4)
#define GICR_WAKER		0x0014
#define GICR_WAKER_SLEEP	(1u << 1)
#define GICR_WAKER_ASLEEP	(1u << 2)
#define GICR_SGI		0x10000
#define GICR_IGROUPR0		(GICR_SGI + 0x0080)
#define GICR_ISENABLER0		(GICR_SGI + 0x0100)
#define GICR_IPRIORITYR		(GICR_SGI + 0x0400)

/* The GIC CPU interface's system registers, by encoding (any assembler takes them). */
#define ICC_IAR1_EL1		S3_0_C12_C12_0
#define ICC_EOIR1_EL1		S3_0_C12_C12_1
#define ICC_BPR1_EL1		S3_0_C12_C12_3
#define ICC_SRE_EL1		S3_0_C12_C12_5
#define ICC_IGRPEN1_EL1		S3_0_C12_C12_7
#define ICC_PMR_EL1		S3_0_C4_C6_0
#define ICC_SGI1R_EL1		S3_0_C12_C11_5

#define SGI_INTID		1
#define PL031_DR		0x00
#define PL031_MR		0x04
#define PL031_IMSC		0x10
#define PL031_ICR		0x1c
#define CNTV_CTL_ENABLE		(1u << 0)
#define CNTV_CTL_IMASK		(1u << 1)

static volatile u32 irq_count, last_intid, spurious;
void (*gic_lpi_handler)(u32 intid);
static u32 timer_intid, rtc_intid;

static void isb(void) { __asm__ __volatile__("isb" ::: "memory"); }
static void irqs_on(void) { __asm__ __volatile__("msr daifclr, #2; isb" ::: "memory"); }
static void irqs_off(void) { __asm__ __volatile__("msr daifset, #2; isb" ::: "memory"); }

/* Called by the IRQ vector: acknowledge, quiet the source, end. False: not ours (fails the run). */
bool irq_dispatch(void)
{
	u64 iar = sysreg_read(ICC_IAR1_EL1);
	u32 intid = (u32)iar & 0xffffff;

	if (intid >= 1020 && intid <= 1023) {
		spurious++;
		return true;
	}
	if (intid >= 8192 && gic_lpi_handler) {	/* an LPI: an MSI through the ITS (msi.c) */
		gic_lpi_handler(intid);
		sysreg_write(ICC_EOIR1_EL1, iar);
		isb();
		return true;
	}
	if (intid == timer_intid && timer_intid)
		sysreg_write(cntv_ctl_el0, CNTV_CTL_IMASK);	/* level: off before EOI */
	else if (intid == rtc_intid && rtc_intid)
		mmio_write32(plat.rtc + PL031_ICR, 1);
	last_intid = intid;
	irq_count++;
	sysreg_write(ICC_EOIR1_EL1, iar);
	isb();
	return intid == SGI_INTID || intid == timer_intid || intid == rtc_intid;
}

static u64 ticks_per_ms(void)
{
	return sysreg_read(cntfrq_el0) / 1000;
}

/*
 * Poll until irq_count passes `before` or `ms` have gone by; the ticks it took, or 0. (Not WFI:
 * with the interrupt missing, nothing would wake it.)
 */
static u64 wait_irq(u32 before, u64 ms)
{
	u64 start = arch_cycles(), limit = ms * ticks_per_ms();

	while (irq_count == before) {
		if (arch_cycles() - start > limit)
			return 0;
		arch_cpu_relax();
	}
	return arch_cycles() - start + 1;
}

static bool gicd_wait_rwp(void)
{
	for (u32 i = 0; i < 1000000; i++)
		if (!(mmio_read32(plat.gic_dist + GICD_CTLR) & GICD_CTLR_RWP))
			return true;
	return false;
}

/* This CPU's redistributor: the frame whose GICR_TYPER affinity is this CPU's MPIDR's. */
static u64 find_redistributor(void)
{
	u64 mpidr = sysreg_read(mpidr_el1);
	u32 affinity = (u32)(mpidr & 0xffffff) | (u32)((mpidr >> 32) & 0xff) << 24;

	for (u64 rd = plat.gic_redist, n = 0; n < 4 * MAX_CPUS; rd += GICR_FRAME, n++) {
		u32 low = mmio_read32(rd + GICR_TYPER);

		if (mmio_read32(rd + GICR_TYPER + 4) == affinity)
			return rd;
		if (low & GICR_TYPER_LAST)
			break;
	}
	return 0;
}

const char *gic_init(u64 *rd_out)
{
	u64 rd;

	mmio_write32(plat.gic_dist + GICD_CTLR, 0);
	if (!gicd_wait_rwp())
		return "GICD_CTLR.RWP never cleared";
	mmio_write32(plat.gic_dist + GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_GRP1 | GICD_CTLR_GRP0);
	if (!gicd_wait_rwp())
		return "GICD_CTLR.RWP never cleared";
	if (!(mmio_read32(plat.gic_dist + GICD_CTLR) & GICD_CTLR_ARE))
		return "GICD_CTLR.ARE is not set (affinity routing off)";
	rd = find_redistributor();
	if (!rd)
		return "no redistributor has this CPU's affinity";
	mmio_write32(rd + GICR_WAKER, mmio_read32(rd + GICR_WAKER) & ~GICR_WAKER_SLEEP);
	for (u32 i = 0; mmio_read32(rd + GICR_WAKER) & GICR_WAKER_ASLEEP; i++)
		if (i > 1000000)
			return "GICR_WAKER.ChildrenAsleep never cleared";
	mmio_write32(rd + GICR_IGROUPR0, 0xffffffff);	/* SGIs and PPIs: group 1 */
	for (u32 i = 0; i < 32; i += 4)
		mmio_write32(rd + GICR_IPRIORITYR + i, 0x80808080);
	mmio_write32(rd + GICR_ISENABLER0, 1u << SGI_INTID);

	sysreg_write(ICC_SRE_EL1, sysreg_read(ICC_SRE_EL1) | 1);
	isb();
	if (!(sysreg_read(ICC_SRE_EL1) & 1))
		return "ICC_SRE_EL1.SRE stays 0 (no system-register CPU interface)";
	sysreg_write(ICC_PMR_EL1, 0xf0);
	sysreg_write(ICC_BPR1_EL1, 0);
	sysreg_write(ICC_IGRPEN1_EL1, 1);
	isb();
	*rd_out = rd;
	return 0;
}

static void check_sgi(void)
{
	u64 mpidr = sysreg_read(mpidr_el1), took;
	u64 target = (1ull << (mpidr & 0xf)) | ((mpidr >> 8) & 0xff) << 16 | ((mpidr >> 16) & 0xff) << 32 |
		     ((mpidr >> 32) & 0xff) << 48;
	u32 before = irq_count;

	sysreg_write(ICC_SGI1R_EL1, (u64)SGI_INTID << 24 | target);
	isb();
	took = wait_irq(before, 1000);
	if (!took)
		report_fail("gic sgi", "SGI %u to self did not arrive within 1 s", SGI_INTID);
	else if (last_intid != SGI_INTID)
		report_fail("gic sgi", "got INTID %u, expected %u", last_intid, SGI_INTID);
	else
		report_ok("gic sgi", "(INTID %u to self)", SGI_INTID);
}

static void check_timer(u64 rd)
{
	u64 delay = 10 * ticks_per_ms(), took;
	u32 before = irq_count;

	timer_intid = plat.timer_virt_intid;
	if (!timer_intid) {
		report_fail("timer", "no virtual timer interrupt in the device tree");
		return;
	}
	mmio_write32(rd + GICR_ISENABLER0, 1u << timer_intid);
	sysreg_write(cntv_tval_el0, delay);
	sysreg_write(cntv_ctl_el0, CNTV_CTL_ENABLE);
	isb();
	took = wait_irq(before, 2000);
	sysreg_write(cntv_ctl_el0, 0);
	if (!took)
		report_fail("timer", "the virtual timer (INTID %u) did not fire within 2 s", timer_intid);
	else if (last_intid != timer_intid)
		report_fail("timer", "got INTID %u, expected the virtual timer's %u", last_intid, timer_intid);
	else if (took < delay)
		report_fail("timer", "fired after %llu ticks, before the %llu programmed",
			    (unsigned long long)took, (unsigned long long)delay);
	else {
		info("timer", "fired after %llu us", (unsigned long long)(took * 1000 / ticks_per_ms()));
		report_ok("timer", "(virtual timer INTID %u, 10 ms ahead)", timer_intid);
	}
}

static void check_spi(void)
{
	u64 mpidr = sysreg_read(mpidr_el1), took;
	u32 n, before;

	rtc_intid = 0;
	if (!plat.rtc) {
		report_skip("gic spi", "no PL031 in the device tree");
		return;
	}
	n = plat.rtc_irq;
	if (n < 32) {
		report_fail("gic spi", "the PL031 node has no SPI");
		return;
	}
	mmio_write32(plat.gic_dist + GICD_IGROUPR + 4 * (n / 32),
		     mmio_read32(plat.gic_dist + GICD_IGROUPR + 4 * (n / 32)) | 1u << (n % 32));
	mmio_write8(plat.gic_dist + GICD_IPRIORITYR + n, 0x80);
	mmio_write32(plat.gic_dist + GICD_IROUTER + 8 * n, (u32)(mpidr & 0xffffff));
	mmio_write32(plat.gic_dist + GICD_IROUTER + 8 * n + 4, (u32)((mpidr >> 32) & 0xff));
	mmio_write32(plat.gic_dist + GICD_ISENABLER + 4 * (n / 32), 1u << (n % 32));
	rtc_intid = n;
	before = irq_count;
	mmio_write32(plat.rtc + PL031_ICR, 1);
	mmio_write32(plat.rtc + PL031_IMSC, 1);
	mmio_write32(plat.rtc + PL031_MR, mmio_read32(plat.rtc + PL031_DR) + 1);
	took = wait_irq(before, 3000);
	mmio_write32(plat.rtc + PL031_IMSC, 0);
	mmio_write32(plat.gic_dist + GICD_ICENABLER + 4 * (n / 32), 1u << (n % 32));
	if (!took)
		report_fail("gic spi", "the PL031 match interrupt (INTID %u) did not arrive within 3 s", n);
	else if (last_intid != n)
		report_fail("gic spi", "got INTID %u, expected the PL031's %u", last_intid, n);
	else
		report_ok("gic spi", "(PL031 match, INTID %u)", n);
}

static void run_irq(void)
{
	const char *why;
	u64 rd = 0;

	if (!plat.gic_v3 || !plat.gic_dist || !plat.gic_redist) {
		report_fail("irq", "no GICv3 (distributor and redistributor) in the device tree");
		return;
	}
	info("irq", "gicv3 distributor 0x%llx, redistributors 0x%llx", (unsigned long long)plat.gic_dist,
	     (unsigned long long)plat.gic_redist);
	why = gic_init(&rd);
	if (why) {
		report_fail("irq", "%s", why);
		return;
	}
	irqs_on();
	check_sgi();
	check_timer(rd);
	check_spi();
	irqs_off();
	if (spurious)
		info("irq", "%u spurious interrupts", spurious);
}
SELFTEST(irq, run_irq, "GICv3: an SGI to self, the virtual timer's PPI and the PL031's SPI arrive");
