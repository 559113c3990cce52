/* The architecture-independent part of a selftest run. */
#include "arch.h"
#include "bootinfo.h"
#include "printf.h"
#include "report.h"
#include "test.h"

static const char *mem_type(u32 type)
{
	switch (type) {
	case MEM_RAM: return "ram";
	case MEM_RESERVED: return "reserved";
	case MEM_ACPI: return "acpi";
	case MEM_NVS: return "nvs";
	case MEM_UNUSABLE: return "unusable";
	case MEM_PMEM: return "pmem";
	default: return "other";
	}
}

const struct bootinfo *boot_info;

bool memmap_is_ram(const struct bootinfo *bi, u64 start, u64 end)
{
	for (u32 i = 0; i < bi->nr_memmap; i++) {
		const struct memmap_entry *e = &bi->memmap[i];

		if (e->type == MEM_RAM && e->addr <= start && end <= e->addr + e->size)
			return true;
	}
	return false;
}

static void check_memmap(const struct bootinfo *bi)
{
	u64 ram = 0;
	u64 start = (uintptr_t)__image_start, end = (uintptr_t)_end;

	for (u32 i = 0; i < bi->nr_memmap; i++) {
		const struct memmap_entry *e = &bi->memmap[i];

		if (!e->size) {
			info("memmap", "entry %u is empty (type %u)", i, e->type);
			continue;
		}
		info("memmap", "[0x%016llx-0x%016llx] %s", (unsigned long long)e->addr,
		     (unsigned long long)(e->addr + e->size - 1), mem_type(e->type));
		if (e->type == MEM_RAM)
			ram += e->size;
	}
	info("ram", "%llu KiB", (unsigned long long)(ram >> 10));

	if (!bi->nr_memmap)
		report_fail("memmap", "no memory map");
	else if (!memmap_is_ram(bi, start, end))
		report_fail("memmap", "image [0x%llx-0x%llx) is not in RAM",
			    (unsigned long long)start, (unsigned long long)end);
	else
		report_ok("memmap", NULL);
}

__noreturn void selftest_main(const struct bootinfo *bi)
{
	boot_info = bi;
	/* The empty line ends any partial line left by firmware (SeaBIOS). */
	kprintf("\nselftest: vmmkit %s selftest v1\n", ARCH_NAME);
	info("boot", "%s%s%s", bi->method, bi->detail[0] ? " " : "", bi->detail);
	if (bi->error)
		report_fail("boot", "%s", bi->error);
	kprintf("selftest: cmdline: %s\n", bi->cmdline);

	check_memmap(bi);
	arch_checks(bi);
	tests_run(bi->cmdline);
	selftest_exit();
}
