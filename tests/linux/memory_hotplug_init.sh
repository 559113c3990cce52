#!/bin/sh
# /init for the memory hotplug test (tests/linux/test_linux_memory_hotplug.py): busybox sh, PID 1.
#
# One "VMMKIT-MEMHP: <step> ..." line per step on the serial console; the host acts on each.
# Every wait is bounded: on a timeout the line says "timeout <step>" and the VM powers off.
#   ready <kB>                  MemTotal at boot; the host plugs memory (vm.resize desired_ram)
#   grown <kB> <blocks>         MemTotal changed and every memory block is online (the kernel
#                               onlines them with memhp_default_state=online_movable; any block
#                               left offline is onlined here); <blocks>: the memoryN directories
#                               beyond the boot ones (N = physical address / block size)
#   shrunk <kB> <blocks>        MemTotal went down (the kernel offlined, removed and ejected a
#                               DIMM the host asked it to eject)
# "grown" is said once per plug, as many times as the plugs= argument says, then "shrunk" once
# per unplug (unplugs=); then the VM powers off.
# Arguments (after "--"): plugs=<count> unplugs=<count>

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "VMMKIT-MEMHP: $*"; }
PLUGS=1
UNPLUGS=0
for arg in "$@"; do
    case "$arg" in
        plugs=*) PLUGS="${arg#plugs=}" ;;
        unplugs=*) UNPLUGS="${arg#unplugs=}" ;;
    esac
done

memtotal() {
    while read -r key value unit; do
        if [ "$key" = "MemTotal:" ]; then echo "$value"; return; fi
    done < /proc/meminfo
}

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

blocks() {
    list=""
    for block in /sys/devices/system/memory/memory*; do
        name=${block##*/}
        case " $BOOT_BLOCKS " in *" $name "*) ;; *) list="$list $name" ;; esac
    done
    echo "${list# }"
}

online_all() {
    offline=0
    for state in /sys/devices/system/memory/memory*/state; do
        read -r now < "$state"
        if [ "$now" = "offline" ]; then
            echo online > "$state" 2>/dev/null || offline=1
        fi
    done
    return $offline
}

BOOT_BLOCKS=""
for block in /sys/devices/system/memory/memory*; do BOOT_BLOCKS="$BOOT_BLOCKS ${block##*/}"; done
total=$(memtotal)
say "ready $total"

plug=0
while [ "$plug" -lt "$PLUGS" ]; do
    before=$total
    changed() { now=$(memtotal); [ "$now" != "$before" ]; }
    if ! wait_for 240 changed; then say "timeout grown $before"; sync; poweroff -f; fi
    # settle: every block online, MemTotal the same 1 s apart (virtio-mem plugs block by block;
    # on a kvm_pvm host a guest second takes several seconds of wall clock)
    previous=""
    while :; do
        online_all
        sleep 1
        total=$(memtotal)
        [ "$total" = "$previous" ] && break
        previous=$total
    done
    say "grown $total $(blocks)"
    plug=$((plug + 1))
done

unplug=0
while [ "$unplug" -lt "$UNPLUGS" ]; do
    before=$total
    shrunk() { now=$(memtotal); [ "$now" -lt "$before" ]; }
    if ! wait_for 300 shrunk; then say "timeout shrunk $before $(blocks)"; sync; poweroff -f; fi
    previous=""
    while :; do
        sleep 1
        total=$(memtotal)
        [ "$total" = "$previous" ] && break
        previous=$total
    done
    say "shrunk $total $(blocks)"
    unplug=$((unplug + 1))
done
sync
poweroff -f
