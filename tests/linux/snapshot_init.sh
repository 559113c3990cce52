#!/bin/sh
# /init for the Linux snapshot test (tests/linux/test_linux_snapshot.py): busybox sh, PID 1.
#
# Writes a word to a file in tmpfs, then counts: one "VMMKIT-SNAP: tick <n> <the file's word>"
# line about every 0.2 s of guest time. The host snapshots the VM while it counts, restores it in
# a new VMM process and checks that the count goes on from where it was and the file is intact.
# Bounded: after 3000 ticks it says "timeout" and powers off.
# Arguments (after "--"): word=<word>

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null

say() { echo "VMMKIT-SNAP: $*"; }
WORD=snapshot
for arg in "$@"; do
    case "$arg" in
        word=*) WORD="${arg#word=}" ;;
    esac
done

echo "$WORD" > /tmp/before
n=0
while [ $n -lt 3000 ]; do
    n=$((n + 1))
    read -r before < /tmp/before
    say "tick $n $before"
    sleep 0.2
done
say "timeout"
poweroff -f
