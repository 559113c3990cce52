#!/bin/sh
# /init.sh of the nested Linux that checks a passed-through NVMe controller (archived by
# lab/linux/nested_initramfs.py --init-sh; the wrapper /init loaded the modules). Its own nvme
# driver must find the controller and namespace 1; the first line of sector 0 (written by the
# host before the lab booted) is printed; 4 KiB of "<pattern>\n" are written at 2 MiB, flushed,
# the page cache dropped, read back and compared. Every line starts "VMMKIT-NVME: ". Then power off;
# with nvme_after=wait on the command line, list the virtio disks (read-only flag), stay up and
# report PCI functions coming and going, until the VMM's shutdown (lab/vfio/kata-on-vmmkit.sh).
say() { echo "VMMKIT-NVME: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
pattern=vmmkit-nvme-pattern
after=poweroff
for arg in $(cat /proc/cmdline); do
    case "$arg" in nvme_pattern=*) pattern=${arg#nvme_pattern=} ;; nvme_after=*) after=${arg#nvme_after=} ;; esac
done
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/nvme0n1 ]; then
    ctrl=/sys/class/nvme/nvme0
    say "controller nvme0: serial '$(cat $ctrl/serial | tr -d ' ')', model '$(cat $ctrl/model | sed 's/ *$//')', driver $(basename "$(readlink $ctrl/device/driver)")"
    say "namespace nvme0n1: $(cat /sys/block/nvme0n1/size) sectors of 512 bytes"
    say "sector 0: $(dd if=/dev/nvme0n1 bs=512 count=1 2>/dev/null | head -n 1)"
    : > /tmp/pattern
    n=0
    while [ $n -lt 4096 ]; do printf '%s\n' "$pattern" >> /tmp/pattern; n=$((n + ${#pattern} + 1)); done
    dd if=/tmp/pattern of=/tmp/page bs=4096 count=1 2>/dev/null
    dd if=/tmp/page of=/dev/nvme0n1 bs=4096 seek=512 count=1 conv=fsync 2>/dev/null
    blockdev --flushbufs /dev/nvme0n1
    echo 3 > /proc/sys/vm/drop_caches
    dd if=/dev/nvme0n1 of=/tmp/readback bs=4096 skip=512 count=1 2>/dev/null
    if cmp -s /tmp/page /tmp/readback; then
        say "ok: 4 KiB of '$pattern' written at 2 MiB, flushed and read back"
    else
        say "FAIL: the pattern read back at 2 MiB differs"
    fi
    say "admin queue interrupt: $(grep 'nvme0q0$' /proc/interrupts | awk '{print $(NF-3), $(NF-1)}')"
else
    say "FAIL: no /dev/nvme0n1 after 20 s"
    ls /sys/class/nvme 2>&1 | while read -r line; do say "sys/class/nvme: $line"; done
fi
sync
if [ "$after" = wait ]; then
    for disk in /sys/block/vd*; do
        [ -e "$disk" ] && say "disk ${disk##*/}: ro=$(cat "$disk/ro") $(cat "$disk/size") sectors"
    done
    say "waiting for the VMM's shutdown"
    # and say which PCI functions come (ACPI hotplug) and go (ejected): "pci + BDF VENDOR:DEVICE"
    ls /sys/bus/pci/devices > /tmp/pci
    while :; do
        sleep 0.5
        ls /sys/bus/pci/devices > /tmp/pci.now
        for bdf in $(cat /tmp/pci.now); do
            grep -qx "$bdf" /tmp/pci || say "pci + $bdf $(cut -c3- /sys/bus/pci/devices/$bdf/vendor):$(cut -c3- /sys/bus/pci/devices/$bdf/device)"
        done
        for bdf in $(cat /tmp/pci); do grep -qx "$bdf" /tmp/pci.now || say "pci - $bdf"; done
        mv /tmp/pci.now /tmp/pci
    done
fi
poweroff -f
