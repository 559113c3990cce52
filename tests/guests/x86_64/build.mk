# x86-64: general registers only (no SSE/x87) and no red zone, since guest
# ring-0 code may be emulated and interrupts use the current stack.
ARCH_CFLAGS := -mno-red-zone -mgeneral-regs-only -mcmodel=small \
	-mstringop-strategy=loop -march=x86-64 -mtune=generic -fcf-protection=none
ARCH_ASFLAGS :=
ARCH_EXCLUDE := x86_64/setup.S
ARCH_TARGETS := $(BUILD)/selftest.bzImage $(BUILD)/selftest.checked

# The emulator behind some KVMs cannot run SSE and crawls through rep
# string loops: refuse a kernel that contains any.
$(BUILD)/selftest.checked: $(BUILD)/selftest.elf
	$(Q)if $(OBJDUMP) -d $< | grep -E 'rep[a-z]* (movs|stos|ins|outs|cmps|scas)|%[xyz]mm[0-9]|\b(ldmxcsr|fxsave|xrstor|int3)\b'; then \
		echo "$<: forbidden instructions (see above)"; exit 1; fi
	@touch $@

# bzImage = real-mode setup (setup.S, 4 KiB) + the payload.
$(BUILD)/setup.bin: $(OBJDIR)/x86_64/setup.o x86_64/setup.ld
	$(say) "  LD      $@"
	$(Q)$(LD) -T x86_64/setup.ld -o $(OBJDIR)/setup.elf $<
	$(Q)$(OBJCOPY) -O binary -j .setup $(OBJDIR)/setup.elf $@

$(BUILD)/selftest.bzImage: $(BUILD)/setup.bin $(BUILD)/selftest.bin $(BUILD)/selftest.elf x86_64/mkbzimage.py
	$(say) "  BZIMAGE $@"
	$(Q)$(PYTHON) x86_64/mkbzimage.py $(BUILD)/setup.bin $(BUILD)/selftest.bin $(BUILD)/selftest.elf $@
