/* What the boot protocol told us, copied out of the VMM's boot structures. */
#ifndef COMMON_BOOTINFO_H
#define COMMON_BOOTINFO_H

#include "types.h"

#define CMDLINE_MAX 2048
#define MEMMAP_MAX 128

/* E820 / PVH memory types. */
enum { MEM_RAM = 1, MEM_RESERVED = 2, MEM_ACPI = 3, MEM_NVS = 4,
       MEM_UNUSABLE = 5, MEM_PMEM = 7 };

struct memmap_entry {
	u64 addr, size;
	u32 type;
};

struct bootinfo {
	const char *method;		/* "pvh", "linux64", "linux32" */
	char detail[128];		/* informational: where things were */
	const char *error;		/* non-NULL: the boot data was unusable */
	char cmdline[CMDLINE_MAX];
	struct memmap_entry memmap[MEMMAP_MAX];
	u32 nr_memmap;
	u64 rsdp;			/* ACPI RSDP hint, 0 if none */
};

/* The boot information of this run (set before any test runs). */
extern const struct bootinfo *boot_info;

/* Does one RAM entry of the memory map cover [start, end)? */
bool memmap_is_ram(const struct bootinfo *bi, u64 start, u64 end);

#endif
