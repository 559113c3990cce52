/* Basic types and helpers shared by every file of the selftest guest. */
#ifndef COMMON_TYPES_H
#define COMMON_TYPES_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((__typeof__(x))(a) - 1))
#define __noreturn __attribute__((noreturn))
#define __packed __attribute__((packed))
#define __printf(f, a) __attribute__((format(printf, f, a)))
#define __used __attribute__((used))
/* Not part of the image and not zeroed at boot (DMA buffers, page tables). */
#define __noinit __attribute__((section(".noinit")))

#define barrier() __asm__ __volatile__("" ::: "memory")
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* Unaligned little-endian loads from firmware tables. */
static inline u16 get16(const void *p) { u16 v; __builtin_memcpy(&v, p, 2); return v; }
static inline u32 get32(const void *p) { u32 v; __builtin_memcpy(&v, p, 4); return v; }
static inline u64 get64(const void *p) { u64 v; __builtin_memcpy(&v, p, 8); return v; }

/* A guest-physical address below 4 GiB (identity-mapped) as a pointer. */
static inline void *phys(u64 addr) { return (void *)(uintptr_t)addr; }

#endif
