/* The boot structures a VMM hands over: PVH start_info and Linux boot_params. */
#ifndef X86_64_BOOTPARAM_H
#define X86_64_BOOTPARAM_H

#include "types.h"

/* Xen public/arch-x86/hvm/start_info.h */
#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	/* version >= 1 */
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
} __packed;

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
} __packed;

/* Offsets into struct boot_params (the "zero page"), Linux boot.rst. */
#define BP_ACPI_RSDP_ADDR	0x070	/* u64, protocol 2.14 */
#define BP_EXT_CMD_LINE_PTR	0x0c8	/* u32 */
#define BP_E820_ENTRIES		0x1e8	/* u8 */
#define BP_HDR_HEADER		0x202	/* "HdrS" */
#define BP_HDR_VERSION		0x206	/* u16 */
#define BP_HDR_TYPE_OF_LOADER	0x210	/* u8 */
#define BP_HDR_CMD_LINE_PTR	0x228	/* u32 */
#define BP_HDR_CMDLINE_SIZE	0x238	/* u32 */
#define BP_E820_TABLE		0x2d0	/* 128 x struct boot_e820_entry */
#define BP_E820_MAX		128

struct boot_e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} __packed;

#endif
