"""Debug ports: boot-progress port 0x80, Bochs debug console 0xe9, QEMU isa-debug-exit."""
