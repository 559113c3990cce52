vmmkit plugins | grep -E "^\s+kvm"
time vmmkit --hypervisor kvm --kernel tests/guests/build/x86_64/selftest.elf --cmdline hello --cpus boot=2 2>&1 | tail -30; echo "exit $?"
