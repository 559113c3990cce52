#include "apic.h"
#include "io.h"
#include "layout.h"

#define MSR_APIC_BASE	0x1b
#define APIC_BASE_EN	(1u << 11)
#define APIC_BASE_EXTD	(1u << 10)	/* x2APIC mode */

#define APIC_ID		0x020
#define APIC_EOI	0x0b0
#define APIC_SVR	0x0f0
#define APIC_ICR_LO	0x300
#define APIC_ICR_HI	0x310

#define ICR_FIXED	0x00000
#define ICR_INIT	0x00500
#define ICR_STARTUP	0x00600
#define ICR_PENDING	0x01000		/* xAPIC delivery status */
#define ICR_ASSERT	0x04000
#define ICR_OTHERS	0xc0000		/* shorthand: all excluding self */

static u64 base = 0xfee00000;
static bool x2apic;

static u32 rd(u32 reg)
{
	return x2apic ? (u32)rdmsr(0x800 + (reg >> 4)) : mmio_read32(base + reg);
}

static void wr(u32 reg, u32 v)
{
	if (x2apic)
		wrmsr(0x800 + (reg >> 4), v);
	else
		mmio_write32(base + reg, v);
}

void apic_init(u64 madt_base)
{
	u64 msr = rdmsr(MSR_APIC_BASE);

	x2apic = msr & APIC_BASE_EXTD;
	base = msr & ~0xfffull & ((1ull << 52) - 1);
	if (!base)
		base = madt_base ? madt_base : 0xfee00000;
}

void apic_enable(void)
{
	u64 msr = rdmsr(MSR_APIC_BASE);

	/* An AP follows the BSP's mode (INIT does not change the MSR). */
	if (x2apic && !(msr & APIC_BASE_EXTD))
		wrmsr(MSR_APIC_BASE, msr | APIC_BASE_EN | APIC_BASE_EXTD);
	else if (!(msr & APIC_BASE_EN))
		wrmsr(MSR_APIC_BASE, msr | APIC_BASE_EN);
	wr(APIC_SVR, 0x100 | SPURIOUS_VECTOR);
}

bool apic_x2apic(void) { return x2apic; }
u64 apic_base(void) { return base; }

u32 apic_id(void)
{
	return x2apic ? rd(APIC_ID) : rd(APIC_ID) >> 24;
}

void apic_eoi(void)
{
	wr(APIC_EOI, 0);
}

static bool send(u32 dest, u32 icr)
{
	if (x2apic) {
		wrmsr(0x830, (u64)dest << 32 | icr);	/* one write, no status */
		return true;
	}
	wr(APIC_ICR_HI, dest << 24);
	wr(APIC_ICR_LO, icr);
	for (unsigned i = 0; i < 100000; i++)
		if (!(rd(APIC_ICR_LO) & ICR_PENDING))
			return true;
	return false;
}

bool apic_send_init(u32 dest)
{
	return send(dest, ICR_INIT | ICR_ASSERT);
}

bool apic_send_sipi(u32 dest, u8 vector)
{
	return send(dest, ICR_STARTUP | ICR_ASSERT | vector);
}

bool apic_send_others(u8 vector)
{
	return send(0, ICR_OTHERS | ICR_FIXED | ICR_ASSERT | vector);
}
