#!/bin/sh
# /init for bench/hotplug.py: busybox sh, PID 1. It watches what the guest sees of its CPUs,
# memory and disks and prints one line on the serial console whenever that changes:
#   VMMKIT-HPBENCH: present=<cpus> online=<cpus> mem=<MemTotal kB> blk=<block devices>
# (the first line is the state at boot). The host times each line's arrival. Processors that
# appear offline are onlined here (there is no udev); memory is onlined by the kernel
# (memhp_default_state=online on the command line). The VMM is killed by the host at the end.
# Arguments (after "--"): poll=<guest seconds between two looks> (default 0.01)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

POLL=0.01
for arg in "$@"; do
    case "$arg" in
        poll=*) POLL="${arg#poll=}" ;;
    esac
done
CPU=/sys/devices/system/cpu

# Everything below runs without a fork (builtins and reads only) but the sleep: each fork
# costs on a host that emulates the guest kernel.
look() {
    read -r present < $CPU/present
    read -r online < $CPU/online
    while read -r key value unit; do
        if [ "$key" = "MemTotal:" ]; then mem=$value; break; fi
    done < /proc/meminfo
    blk=""
    for device in /sys/block/*; do [ -e "$device" ] && blk="$blk,${device##*/}"; done
    blk=${blk#,}
}

online_new_cpus() {
    for state in $CPU/cpu[0-9]*/online; do
        [ -e "$state" ] || continue
        read -r value < "$state"
        [ "$value" = 0 ] && echo 1 > "$state" 2>/dev/null
    done
}

last=""
while :; do
    look
    now="present=$present online=$online mem=$mem blk=$blk"
    if [ "$now" != "$last" ]; then
        echo "VMMKIT-HPBENCH: $now"
        last=$now
    fi
    [ "$present" != "$online" ] && online_new_cpus
    sleep "$POLL"
done
