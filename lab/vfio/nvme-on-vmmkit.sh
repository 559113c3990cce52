#!/bin/sh
# Inside the AArch64 lab (issue 19): bind the lab's NVMe controller (QEMU's, 1b36:0010) to
# vfio-pci and boot the lab's own Debian kernel nested on vmmkit's KVM with it passed through;
# the nested /init (lab/vfio/nvme-init.sh) finds it with its own nvme driver, prints sector 0 and
# writes "<PATTERN>\n" x 4 KiB at 2 MiB and reads it back. The host checks the image afterwards
# (tests/lab/test_lab_vfio_nvme_aarch64.py). From the host:
#   truncate -s 16M nvme.img; lab/run --add kernel --iommu --nvme nvme.img -- sh lab/vfio/nvme-on-vmmkit.sh
set -e
kernel=${KERNEL:-/lab/files/Image}
sh lab/vfio/bind.sh 1b36:0010
bdf=
for dev in /sys/bus/pci/devices/*; do
    if [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = 0x1b36:0x0010 ]; then bdf=${dev##*/}; break; fi
done
python3 lab/linux/nested_initramfs.py /tmp/nvme.cpio --init-sh lab/vfio/nvme-init.sh
echo "VMMKIT-VFIO: vmmkit --hypervisor kvm --kernel $kernel --device path=/sys/bus/pci/devices/$bdf"
exec vmmkit --hypervisor kvm --kernel "$kernel" --initramfs /tmp/nvme.cpio --memory "${MEMORY:-size=256M}" \
    --cpus boot=2 --cmdline "console=ttyAMA0 quiet nvme_pattern=${PATTERN:-vmmkit-nvme-pattern}" \
    --device "path=/sys/bus/pci/devices/$bdf" "$@"
