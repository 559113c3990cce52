# AArch64: cross-compiled (Debian's gcc-aarch64-linux-gnu), general registers
# only (no FP/SIMD: CPACR_EL1 stays at its reset value). entry.S turns the
# MMU on (an identity map) before any C runs, so unaligned accesses are fine.
ifeq ($(CROSS_COMPILE),)
CROSS_COMPILE := aarch64-linux-gnu-
endif
CC := $(CROSS_COMPILE)gcc
LD := $(CROSS_COMPILE)ld
OBJCOPY := $(CROSS_COMPILE)objcopy
OBJDUMP := $(CROSS_COMPILE)objdump

ARCH_CFLAGS := -march=armv8-a -mgeneral-regs-only -mcmodel=small \
	-mno-outline-atomics -fno-omit-frame-pointer
ARCH_ASFLAGS := -march=armv8-a
ARCH_EXCLUDE :=
ARCH_TARGETS := $(BUILD)/selftest.Image

# The arm64 Image is the flat binary of the ELF: its first 64 bytes are the
# Image header (aarch64/entry.S), checked here for the "ARM\x64" magic.
$(BUILD)/selftest.Image: $(BUILD)/selftest.elf
	$(say) "  IMAGE   $@"
	$(Q)$(OBJCOPY) -O binary $< $@.tmp
	$(Q)if [ "$$(dd if=$@.tmp bs=1 skip=56 count=4 2>/dev/null)" != "$$(printf 'ARM\144')" ]; then \
		echo "$@: no arm64 Image magic at 0x38"; rm -f $@.tmp; exit 1; fi
	$(Q)mv $@.tmp $@
