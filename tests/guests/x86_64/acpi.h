/* The few ACPI tables the selftest reads: RSDP, XSDT/RSDT, MADT, FADT, DSDT. */
#ifndef X86_64_ACPI_H
#define X86_64_ACPI_H

#include "types.h"

#define ACPI_MAX_CPUS 256
#define ACPI_MAX_IOAPICS 8
#define ACPI_MAX_OVERRIDES 16

/* Generic Address Structure */
struct acpi_gas {
	u8 space;		/* 0: memory, 1: I/O */
	u8 bit_width, bit_offset, access_size;
	u64 address;
} __packed;

/* MADT I/O APIC (type 1) */
struct acpi_ioapic {
	u8 id;
	u32 addr, gsi_base;
};

/* MADT Interrupt Source Override (type 2): ISA IRQ source is GSI gsi. */
struct acpi_override {
	u8 bus, source;
	u16 flags;			/* MPS INTI: polarity bits 0-1, trigger bits 2-3 */
	u32 gsi;
};

struct acpi_info {
	u64 rsdp;			/* 0: no ACPI */
	bool have_madt, have_fadt;
	/* MADT */
	u32 cpu_ids[ACPI_MAX_CPUS];	/* enabled local APIC / x2APIC ids */
	unsigned nr_cpus;
	u64 lapic_addr;
	struct acpi_ioapic ioapics[ACPI_MAX_IOAPICS];
	unsigned nr_ioapics;
	struct acpi_override overrides[ACPI_MAX_OVERRIDES];
	unsigned nr_overrides;
	/* FADT and DSDT, for power-off */
	bool hw_reduced;
	struct acpi_gas sleep_ctl, pm1a_cnt, pm1b_cnt;
	u32 smi_cmd;
	u8 acpi_enable, century;
	u16 boot_arch;			/* IAPC_BOOT_ARCH */
#define ACPI_BOOT_ARCH_NO_CMOS_RTC (1u << 5)
	int s5_typ_a, s5_typ_b;		/* -1: no \_S5 found */
};

extern struct acpi_info acpi;

/* Find and check the tables (hint: RSDP from the boot protocol, or 0). */
void acpi_init(u64 rsdp_hint);

/* Enter S5; returns only if the write did not take effect at once. */
void acpi_poweroff(void);

#endif
