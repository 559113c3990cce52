/* Turn whichever boot protocol entered us into a struct bootinfo. */
#include "boot.h"
#include "bootparam.h"
#include "layout.h"
#include "printf.h"
#include "string.h"

/* Set by entry.S. */
extern u64 boot_data;
extern u32 boot_method, boot_ebp;

static const u64 LOW_4G = 1ull << 32;

static void copy_cmdline(struct bootinfo *bi, u64 addr, size_t max)
{
	const char *s = phys(addr);
	size_t n;

	bi->cmdline[0] = 0;
	if (!addr)
		return;
	if (addr >= LOW_4G) {
		bi->error = "command line above 4 GiB";
		return;
	}
	if (max > CMDLINE_MAX - 1)
		max = CMDLINE_MAX - 1;
	n = strnlen(s, max);
	memcpy(bi->cmdline, s, n);
	bi->cmdline[n] = 0;
}

static void parse_pvh(struct bootinfo *bi, const struct hvm_start_info *si)
{
	bi->method = "pvh";
	snprintf(bi->detail, sizeof(bi->detail),
		 "(start_info 0x%llx, version %u, rsdp 0x%llx)",
		 (unsigned long long)boot_data, si->version,
		 (unsigned long long)si->rsdp_paddr);
	if (si->magic != HVM_START_MAGIC) {
		bi->error = "bad hvm_start_info magic";
		return;
	}
	copy_cmdline(bi, si->cmdline_paddr, CMDLINE_MAX - 1);
	bi->rsdp = si->rsdp_paddr;
	if (si->version < 1 || !si->memmap_paddr || si->memmap_paddr >= LOW_4G)
		return;

	const struct hvm_memmap_entry *e = phys(si->memmap_paddr);

	for (u32 i = 0; i < si->memmap_entries && i < MEMMAP_MAX; i++) {
		bi->memmap[i].addr = e[i].addr;
		bi->memmap[i].size = e[i].size;
		bi->memmap[i].type = e[i].type;
		bi->nr_memmap++;
	}
}

static void parse_linux(struct bootinfo *bi, const u8 *bp)
{
	bool hdrs = get32(bp + BP_HDR_HEADER) == 0x53726448;	/* "HdrS" */
	u16 version = hdrs ? get16(bp + BP_HDR_VERSION) : 0;
	u64 cmdline = get32(bp + BP_HDR_CMD_LINE_PTR) |
		      (u64)get32(bp + BP_EXT_CMD_LINE_PTR) << 32;
	size_t max = CMDLINE_MAX - 1;
	const struct boot_e820_entry *e = (const void *)(bp + BP_E820_TABLE);
	u32 n = bp[BP_E820_ENTRIES];

	bi->method = boot_method == BOOT_LINUX64 ? "linux64" : "linux32";
	snprintf(bi->detail, sizeof(bi->detail),
		 "(boot_params 0x%llx, protocol %u.%02u, loader 0x%02x%s)",
		 (unsigned long long)boot_data, version >> 8, version & 0xff,
		 bp[BP_HDR_TYPE_OF_LOADER],
		 boot_method == BOOT_LINUX32 && boot_ebp == SETUP16_MAGIC ?
		 ", via real-mode setup" : "");
	if (version >= 0x206 && get32(bp + BP_HDR_CMDLINE_SIZE))
		max = get32(bp + BP_HDR_CMDLINE_SIZE);
	copy_cmdline(bi, cmdline, max);
	bi->rsdp = get64(bp + BP_ACPI_RSDP_ADDR);
	if (n > BP_E820_MAX)
		n = BP_E820_MAX;
	for (u32 i = 0; i < n; i++) {
		bi->memmap[i].addr = e[i].addr;
		bi->memmap[i].size = e[i].size;
		bi->memmap[i].type = e[i].type;
	}
	bi->nr_memmap = n;
}

void boot_parse(struct bootinfo *bi)
{
	bi->method = "unknown";
	if (!boot_data || boot_data >= LOW_4G) {
		bi->error = "no boot structure (null %esi/%ebx)";
		return;
	}
	if (boot_method == BOOT_PVH)
		parse_pvh(bi, phys(boot_data));
	else
		parse_linux(bi, phys(boot_data));
}
