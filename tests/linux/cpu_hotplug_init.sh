#!/bin/sh
# /init for the vCPU hotplug test (tests/linux/test_linux_cpu_hotplug.py): busybox sh, PID 1.
#
# One "VMMKIT-CPUHP: <step> ..." line per step on the serial console; the host acts on each.
# Every wait is bounded: on a timeout the line says "timeout <step> <online>" and the VM powers
# off, so the test fails fast.
#   ready <online>     the guest runs with its boot vCPUs; the host grows it (vm.resize)
#   grown <online>     Linux added the processors the GED's notification announced (ACPI
#                      device check) and /init onlined them; the host shrinks it again
#   shrunk <online> <kB>  Linux offlined and ejected the processors it was asked to remove
#                      (ACPI eject request, _EJ0); <kB>: MemTotal. With memory=yes the host then
#                      plugs an ACPI DIMM (vm.resize desired_ram), otherwise the VM powers off
#   memory <kB> <blocks>  MemTotal changed and every memory block is online (acpi_memhotplug
#                      added the DIMM's _CRS range); <blocks>: the memoryN directories beyond
#                      the boot ones (N = physical address / block size); the VM powers off
# Arguments (after "--"): grown=<cpu list>, shrunk=<cpu list> (as /sys/devices/system/cpu/online),
# memory=yes

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "VMMKIT-CPUHP: $*"; }
GROWN=0-3
SHRUNK=0-1
MEMORY=no
for arg in "$@"; do
    case "$arg" in
        grown=*) GROWN="${arg#grown=}" ;;
        shrunk=*) SHRUNK="${arg#shrunk=}" ;;
        memory=*) MEMORY="${arg#memory=}" ;;
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
memtotal() {
    while read -r key value unit; do
        if [ "$key" = "MemTotal:" ]; then echo "$value"; return; fi
    done < /proc/meminfo
}
# the memory blocks beyond the boot ones, and onlining any the kernel left offline
blocks() {
    list=""
    for block in /sys/devices/system/memory/memory*; do
        name=${block##*/}
        case " $BOOT_BLOCKS " in *" $name "*) ;; *) list="$list $name" ;; esac
    done
    echo "${list# }"
}
online_all() {
    for state in /sys/devices/system/memory/memory*/state; do
        read -r now < "$state"
        [ "$now" = "offline" ] && echo online > "$state" 2>/dev/null
    done
}
BOOT_BLOCKS=""
for block in /sys/devices/system/memory/memory*; do BOOT_BLOCKS="$BOOT_BLOCKS ${block##*/}"; done

say "ready $(online)"
if ! wait_for 300 onlined_to "$GROWN"; then say "timeout grown $(online)"; finish; fi
say "grown $(online)"
if ! wait_for 300 online_is "$SHRUNK"; then say "timeout shrunk $(online)"; finish; fi
BOOT_KB=$(memtotal)
say "shrunk $(online) $BOOT_KB"
[ "$MEMORY" = yes ] || finish
changed() { [ "$(memtotal)" != "$BOOT_KB" ]; }
if ! wait_for 300 changed; then say "timeout memory $BOOT_KB"; finish; fi
# settle: every block online and MemTotal the same 1 s apart
previous=""
while :; do
    online_all
    sleep 1
    total=$(memtotal)
    [ "$total" = "$previous" ] && break
    previous=$total
done
say "memory $total $(blocks)"
finish
