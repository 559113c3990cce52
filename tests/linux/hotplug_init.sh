#!/bin/sh
# /init for the PCI hotplug test (tests/linux/test_linux_hotplug.py): busybox sh, PID 1.
#
# Talks to the host over the serial console, one "VMMKIT-HOTPLUG: <step> ..." line per step; the
# host acts on each (adds a disk, reads the image, removes the disk). Every wait is bounded: on
# a timeout the line says "timeout <step>" and the VM powers off, so the test fails fast.
#   ready                 the guest runs; the host hot-adds a disk
#   added <bdf> <sectors> /dev/vdb appeared (its PCI address); the pattern follows
#   written               the pattern is on the disk (fsync'd); the host checks the image,
#                         resizes vda (vm.resize-disk) and removes the hot-added device
#   resized <sectors>     /sys/block/vda/size changed (the configuration-change interrupt)
#   gone <bdf>            /sys/bus/pci/devices/<bdf> disappeared; with net=, the host hot-adds
#                         a NIC on a tap, else the VM powers off
#   pinged <address>      eth0 appeared, got <address>/<prefix>, and the peer answered a ping
#                         (or "no-answer <address>"); the VM powers off
# Arguments (after "--"): pattern=<word>, net=<address>/<prefix>,<peer>

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-HOTPLUG: $*"; }
PATTERN=hotplug
NET=""
for arg in "$@"; do
    case "$arg" in
        pattern=*) PATTERN="${arg#pattern=}" ;;
        net=*) NET="${arg#net=}" ;;
    esac
done

# wait_for <seconds> <test...>: poll every 0.2 s until the test holds
wait_for() {
    limit=$(($1 * 5))
    shift
    while ! "$@"; do
        limit=$((limit - 1))
        [ "$limit" -le 0 ] && return 1
        sleep 0.2
    done
}

finish() { sync; poweroff -f; }

pcis=""
for dev in /sys/bus/pci/devices/*; do pcis="$pcis ${dev##*/}"; done
say "ready pci:$pcis"

if ! wait_for 240 test -b /dev/vdb; then say "timeout added"; finish; fi
cd -P /sys/block/vdb/device/.. && bdf=${PWD##*/}
cd /
read -r sectors < /sys/block/vdb/size
say "added $bdf $sectors"

block="$PATTERN
"
while [ ${#block} -lt 4096 ]; do block="$block$block"; done
printf '%s' "${block:0:4096}" > /tmp/pattern
dd if=/tmp/pattern of=/dev/vdb bs=4096 seek=256 count=1 conv=fsync 2>/dev/null
blockdev --flushbufs /dev/vdb
# vda's size before the host may resize it: it does so as soon as it reads "written".
read -r vda_before < /sys/block/vda/size
say "written"

vda_changed() { read -r now < /sys/block/vda/size; [ "$now" != "$vda_before" ]; }
if ! wait_for 240 vda_changed; then say "timeout resized $vda_before"; finish; fi
read -r vda_after < /sys/block/vda/size
say "resized $vda_after"

if ! wait_for 240 test ! -e "/sys/bus/pci/devices/$bdf"; then say "timeout gone $bdf"; finish; fi
if [ -b /dev/vdb ]; then say "still-there /dev/vdb"; fi
say "gone $bdf"

if [ -n "$NET" ]; then
    address=${NET%%,*}
    peer=${NET#*,}
    if ! wait_for 240 test -e /sys/class/net/eth0; then say "timeout pinged"; finish; fi
    ip link set eth0 up
    ip addr add "$address" dev eth0
    if ping -c 1 -W 10 "$peer" > /dev/null 2>&1; then say "pinged $address"; else say "no-answer $address"; fi
fi
finish
