#!/bin/sh
# Inside the lab (lab/lab.py run --iommu ...): bind every PCI function with one of the given
# vendor:device ids (hex, e.g. 1234:11e8) to vfio-pci through driver_override, after unbinding
# its current driver, and report where its VFIO group is:
#   VMMKIT-VFIO: bind 0000:00:02.0 1234:11e8 driver vfio-pci group 0 (1 device) /dev/vfio/0 present
# Exit status: 0 if every id matched at least one function and each ended on vfio-pci with its
# group's character device present; 1 otherwise. (Linux: Documentation/driver-api/vfio.rst.)
status=0
[ -d /sys/kernel/iommu_groups ] && [ -n "$(ls /sys/kernel/iommu_groups)" ] \
    || { echo "VMMKIT-VFIO: no IOMMU groups (is there an IOMMU? lab.py run --iommu)"; status=1; }
for id in "$@"; do
    vendor=0x${id%%:*}
    device=0x${id##*:}
    found=0
    for dev in /sys/bus/pci/devices/*; do
        [ "$(cat "$dev/vendor")" = "$vendor" ] && [ "$(cat "$dev/device")" = "$device" ] || continue
        found=1
        bdf=${dev##*/}
        if [ -e "$dev/driver" ]; then
            echo "VMMKIT-VFIO: unbind $bdf from $(basename "$(readlink "$dev/driver")")"
            echo "$bdf" > "$dev/driver/unbind"
        fi
        echo vfio-pci > "$dev/driver_override"
        echo "$bdf" > /sys/bus/pci/drivers_probe
        driver=none
        [ -e "$dev/driver" ] && driver=$(basename "$(readlink "$dev/driver")")
        group=none
        [ -e "$dev/iommu_group" ] && group=$(basename "$(readlink "$dev/iommu_group")")
        members=$(ls "/sys/kernel/iommu_groups/$group/devices" 2>/dev/null | wc -l)
        node=missing
        [ -c "/dev/vfio/$group" ] && node=present
        echo "VMMKIT-VFIO: bind $bdf $id driver $driver group $group ($members device(s)) /dev/vfio/$group $node"
        [ "$driver" = vfio-pci ] && [ "$node" = present ] || status=1
    done
    [ "$found" = 1 ] || { echo "VMMKIT-VFIO: no PCI function $id"; status=1; }
done
exit $status
