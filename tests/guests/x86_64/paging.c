/*
 * arch_map_mmio: make device MMIO above 4 GiB reachable. entry.S
 * identity-maps 0-4 GiB (3-4 GiB uncached); a 64-bit PCI BAR may sit
 * anywhere below 2^47 (vmmkit puts its 64-bit window above the RAM, SeaBIOS
 * sometimes at the top of the physical address space). Such ranges get
 * identity-mapped, uncached 2 MiB pages; the page-table pages come from a
 * small pool that is not part of the image.
 */
#include "arch.h"
#include "io.h"
#include "string.h"

#define PTE_P		0x001
#define PTE_W		0x002
#define PTE_PWT		0x008
#define PTE_PCD		0x010
#define PTE_PS		0x080
#define PTE_ADDR	0x000ffffffffff000ull
#define PT_POOL		8

extern u64 pml4[];
static u64 pt_pool[PT_POOL][512] __noinit __attribute__((aligned(4096)));
static unsigned pt_used;

static u64 *next_table(u64 *entry)
{
	u64 *t;

	if (*entry & PTE_P)
		return (*entry & PTE_PS) ? NULL : phys(*entry & PTE_ADDR);
	if (pt_used == PT_POOL)
		return NULL;
	t = pt_pool[pt_used++];
	memset(t, 0, 4096);
	*entry = (u64)(uintptr_t)t | PTE_P | PTE_W;
	return t;
}

/* MAXPHYADDR: address bits above it are reserved in page-table entries. */
static unsigned phys_bits(void)
{
	u32 r[4];

	cpuid(0x80000000, 0, r);
	if (r[0] < 0x80000008)
		return 36;
	cpuid(0x80000008, 0, r);
	return r[0] & 0xff;
}

bool arch_map_mmio(u64 addr, u64 size)
{
	const u64 huge = 2ull << 20;
	u64 end = addr + size;
	unsigned bits = phys_bits();

	if (!size || end < addr || end > (1ull << (bits < 47 ? bits : 47)))
		return false;
	if (end <= (4ull << 30))
		return true;		/* mapped by entry.S */
	for (u64 p = addr & ~(huge - 1); p < end; p += huge) {
		u64 *pdpt, *pd;

		if (p < (4ull << 30))
			continue;
		pdpt = next_table(&pml4[(p >> 39) & 511]);
		if (!pdpt)
			return false;
		pd = next_table(&pdpt[(p >> 30) & 511]);
		if (!pd)
			return false;
		pd[(p >> 21) & 511] = p | PTE_P | PTE_W | PTE_PWT | PTE_PCD | PTE_PS;
		__asm__ __volatile__("invlpg (%0)" :: "r"(p) : "memory");
	}
	return true;
}
