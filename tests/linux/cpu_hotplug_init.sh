#!/bin/sh
# /init for the vCPU hotplug test (tests/linux/test_linux_cpu_hotplug.py): busybox sh, PID 1.
#
# One "VMMKIT-CPUHP: <step> ..." line per step on the serial console; the host acts on each.
# Every wait is bounded: on a timeout the line says "timeout <step> <online>" and the VM powers
# off, so the test fails fast.
#   ready <online>     the guest runs with its boot vCPUs; the host grows it (vm.resize)
#   grown <online>     Linux added the processors the GED's notification announced (ACPI
#                      device check) and /init onlined them; the host shrinks it again
#   shrunk <online>    Linux offlined and ejected the processors it was asked to remove
#                      (ACPI eject request, _EJ0); the VM powers off
# Arguments (after "--"): grown=<cpu list>, shrunk=<cpu list> (as /sys/devices/system/cpu/online)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "VMMKIT-CPUHP: $*"; }
GROWN=0-3
SHRUNK=0-1
for arg in "$@"; do
    case "$arg" in
        grown=*) GROWN="${arg#grown=}" ;;
        shrunk=*) SHRUNK="${arg#shrunk=}" ;;
    esac
done
CPU=/sys/devices/system/cpu

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
online() { read -r now < $CPU/online; echo "$now"; }
online_is() { [ "$(online)" = "$1" ]; }
# onlined_to <list>: hot-added processors are onlined on the way (no udev here to do it)
onlined_to() {
    for state in $CPU/cpu[0-9]*/online; do
        [ -e "$state" ] || continue
        read -r value < "$state"
        [ "$value" = 0 ] && echo 1 > "$state" 2>/dev/null
    done
    online_is "$1"
}
finish() { sync; poweroff -f; }

say "ready $(online)"
if ! wait_for 300 onlined_to "$GROWN"; then say "timeout grown $(online)"; finish; fi
say "grown $(online)"
if ! wait_for 300 online_is "$SHRUNK"; then say "timeout shrunk $(online)"; finish; fi
say "shrunk $(online)"
finish
