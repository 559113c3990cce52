#!/bin/sh
# /init for the virtio-pmem test (tests/linux/test_linux_pmem.py): busybox sh, PID 1.
# The host made an ext4 image (no journal: what the guest syncs is in place, so the host can
# read it with debugfs while the VM runs) holding host.txt, and gave it to the VM as pmem.
#
#   found <sectors>       Linux's virtio_pmem driver made /dev/pmem0 (512-byte sectors)
#   mounted <options>     ext4 mounted with -o dax (the options /proc/mounts shows)
#   host-file <text>      what host.txt says
#   synced                guest.txt written through DAX and sync'ed (a FLUSH request)
#   unmounted             the file system is unmounted
#   removed               /dev/pmem0 went away (only with the "remove" argument: the host
#                         removes the device; else the guest powers off after "unmounted")
#   fail <what>           a step failed; the VM powers off
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-PMEM: $*"; }
fail() { say "fail $*"; poweroff -f; }

limit=600
while [ ! -b /dev/pmem0 ]; do
    limit=$((limit - 1))
    [ "$limit" -le 0 ] && fail "no /dev/pmem0"
    sleep 0.2
done
say "found $(cat /sys/block/pmem0/size)"
mkdir -p /mnt
mount -t ext4 -o dax /dev/pmem0 /mnt || fail "mount -o dax"
say "mounted $(grep ' /mnt ' /proc/mounts | cut -d' ' -f4)"
say "host-file $(cat /mnt/host.txt)"
echo "written by the guest through DAX" > /mnt/guest.txt || fail "write"
sync
say "synced"
umount /mnt || fail "umount"
say "unmounted"
case " $* " in
    *" remove "*)
        limit=1200
        while [ -b /dev/pmem0 ]; do
            limit=$((limit - 1))
            [ "$limit" -le 0 ] && fail "/dev/pmem0 is still there"
            sleep 0.2
        done
        say "removed" ;;
esac
poweroff -f
