python3 lab/linux/nested_initramfs.py /tmp/nested.cpio && ls -la /tmp/nested.cpio /lab/files/Image
truncate -s 8M /tmp/disk.img
time vmmkit --hypervisor kvm --kernel /lab/files/Image --initramfs /tmp/nested.cpio --memory size=256M --cpus boot=2 --disk path=/tmp/disk.img --rng src=/dev/urandom --cmdline "console=ttyAMA0 -- pattern=vmmkit-arm64" 2>&1 | tail -150
echo "vmmkit exit $?"
