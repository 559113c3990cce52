/* Scanning the legacy BIOS areas for RSDP and MP floating pointers. */
#ifndef X86_64_FIRMWARE_H
#define X86_64_FIRMWARE_H

#include "types.h"

/* 8-bit sum of len bytes == 0 */
bool checksum_ok(const void *p, u32 len);

/*
 * Look for a 16-byte aligned structure starting with the 4-byte sig in the
 * first KiB of the EBDA, the last KiB of base memory and 0xe0000-0xfffff;
 * valid() confirms a candidate. Returns its address or 0.
 */
u64 firmware_scan(const char *sig, bool (*valid)(const u8 *p));

#endif
