#!/bin/sh
# Inside the lab (issue 19): bind QEMU's edu to vfio-pci (lab/vfio/bind.sh), then run the self-test
# guest's test=edu on vmmkit's KVM backend with that edu passed through (--device path=...). Extra
# arguments go to vmmkit. From the host:
#   lab/run --iommu --edu -- sh lab/vfio/edu-on-vmmkit.sh                      # AArch64, SMMUv3
#   lab/run x86_64 --smp 1 --iommu --edu -- sh lab/vfio/edu-on-vmmkit.sh       # x86-64, intel-iommu
# The guest's edu lines must equal QEMU's emulated edu's (tests/integration/test_guest_edu_qemu.py).
set -e
sh lab/vfio/bind.sh 1234:11e8
bdf=
for dev in /sys/bus/pci/devices/*; do
    if [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = 0x1234:0x11e8 ]; then bdf=${dev##*/}; break; fi
done
case $(uname -m) in
    aarch64) kernel=tests/guests/build/aarch64/selftest.Image ;;
    *) kernel=tests/guests/build/x86_64/selftest.elf ;;
esac
echo "VMMKIT-VFIO: vmmkit --hypervisor kvm --kernel $kernel --cmdline test=edu --device path=/sys/bus/pci/devices/$bdf $*"
exec vmmkit --hypervisor kvm --kernel "$kernel" --cmdline test=edu --device "path=/sys/bus/pci/devices/$bdf" "$@"
