#!/bin/sh
# /init of the Kata replay's guest (tests/kata): busybox sh, PID 1, standing in for Kata's guest
# image: it mounts the virtio-fs share where Kata's agent does, checks that the rootfs disk is
# read-only, starts /bin/kata-agent (a vsock listener on Kata's agent port 1024, kata_agent.c)
# and stays up. Lines on the serial console ("KATA-INIT: <step> ..."):
#   rootfs ro=<0|1> <sectors>   the first virtio-blk disk (Kata's image) and its read-only flag
#   share mounted | share none  the "kataShared" virtio-fs share (the Go sandbox has one)
#   agent started
#   agent exited <status>       the agent stand-in stopped (then restarted); the tests fail on it

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

mkdir -p /run
say() { echo "KATA-INIT: $*"; echo "$*" >> /run/kata-init.log; }

say "rootfs ro=$(cat /sys/block/vda/ro 2>/dev/null) $(cat /sys/block/vda/size 2>/dev/null)"
SHARED=/run/kata-containers/shared/containers
mkdir -p $SHARED
if mount -t virtiofs kataShared $SHARED 2>/dev/null; then
    echo "written by the guest" > $SHARED/from-guest.txt && sync
    say "share mounted $(cat $SHARED/from-host.txt)"
else
    say "share none"
fi
# Kata's agent is not restarted; the stand-in is, so that the host can read why it stopped.
(while true; do /bin/kata-agent; say "agent exited $?"; sleep 1; done) &
say "agent started"
while true; do sleep 3600; done
