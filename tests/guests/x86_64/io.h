/* Port I/O, MMIO, MSRs and CPUID. */
#ifndef X86_64_IO_H
#define X86_64_IO_H

#include "types.h"

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ __volatile__("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" :: "a"(v), "Nd"(port)); }

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ __volatile__("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* MMIO: one plain mov each (the emulator decodes them; no string ops). */
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)phys(addr); }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)phys(addr); }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)phys(addr); }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)phys(addr) = v; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)phys(addr) = v; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)phys(addr) = v; }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return lo | (u64)hi << 32;
}

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ __volatile__("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ __volatile__("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			     : "a"(leaf), "c"(sub));
}

#endif
