#!/bin/sh
# Inside the AArch64 or x86-64 lab (issue 21): Kata Containers' Go runtime starts a debug sandbox on vmmkit
# with the lab's NVMe controller cold-plugged (VmConfig.devices in vm.create, as clh.go does) and
# hot-plugs the edu (vm.add-device), replayed by tests/lab/kata_vfio_replay.py; the nested Linux
# is the NVMe check of lab/vfio/nvme-init.sh, staying up until Kata's vmm.shutdown. "quiet" is
# configuration-clh.toml's kernel_params: a debug sandbox's console would print the whole boot log
# through the emulated serial port (~265 s instead of ~90 s in the AArch64 lab). Extra arguments go to the replay. From the host:
#   truncate -s 16M nvme.img; lab/run --add kernel --iommu --edu --nvme nvme.img -- sh lab/vfio/kata-on-vmmkit.sh
#   lab/run x86_64 --smp 1 --add kernel --iommu --edu --nvme nvme.img -- sh lab/vfio/kata-on-vmmkit.sh
set -e
sh lab/vfio/bind.sh 1b36:0010 1234:11e8
bdf_of() {
    for dev in /sys/bus/pci/devices/*; do
        if [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = "$1" ]; then echo "${dev##*/}"; return; fi
    done
}
python3 lab/linux/nested_initramfs.py /tmp/kata.cpio --init-sh lab/vfio/nvme-init.sh
exec python3 tests/lab/kata_vfio_replay.py --cold "$(bdf_of 0x1b36:0x0010)" --hot "$(bdf_of 0x1234:0x11e8)" \
    --kernel "${KERNEL:-/lab/files/Image}" --initramfs /tmp/kata.cpio \
    --kernel-params "quiet nvme_pattern=${PATTERN:-vmmkit-kata-pattern} nvme_after=wait" "$@"
