#!/bin/sh
# /init for the balloon test (tests/linux/test_linux_balloon.py): busybox sh, PID 1.
#
# One "VMMKIT-BALLOON: <step> ..." line per step on the serial console; the host acts on each.
# Every wait is bounded: on a timeout the line says "timeout <step> ..." and the VM powers off.
#   ready <MemTotal> <MemAvailable> <driver>   (kB; the virtio device virtio_balloon bound);
#                         the host inflates the balloon (mode=inflate) or watches free page
#                         reporting give memory back (mode=report: the guest just waits)
#   inflated <MemTotal> <MemAvailable>   MemTotal fell by at least 9/10 of balloon= (MiB); the
#                         host deflates to 0
#   deflated <MemTotal> <MemAvailable>   MemTotal came back; the VM powers off
# Arguments (after "--"): mode=inflate|report, balloon=<MiB>

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-BALLOON: $*"; }
MODE=inflate
BALLOON=0
for arg in "$@"; do
    case "$arg" in
        mode=*) MODE="${arg#mode=}" ;;
        balloon=*) BALLOON="${arg#balloon=}" ;;
    esac
done

# meminfo <field>: the field's value in kB
meminfo() {
    while read -r key value _; do
        if [ "$key" = "$1:" ]; then echo "$value"; return; fi
    done < /proc/meminfo
}

# wait_for <seconds> <test...>: poll every 0.5 s until the test holds
wait_for() {
    limit=$(($1 * 2))
    shift
    while ! "$@"; do
        limit=$((limit - 1))
        [ "$limit" -le 0 ] && return 1
        sleep 0.5
    done
}

finish() { sync; poweroff -f; }

driver=none
for dev in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do [ -e "$dev" ] && driver=${dev##*/}; done
total=$(meminfo MemTotal)
say "ready $total $(meminfo MemAvailable) $driver"

if [ "$MODE" = report ]; then
    sleep 900
    finish
fi

smaller() { [ "$(meminfo MemTotal)" -le $((total - BALLOON * 1024 * 9 / 10)) ]; }
if ! wait_for 300 smaller; then say "timeout inflated $(meminfo MemTotal)"; finish; fi
say "inflated $(meminfo MemTotal) $(meminfo MemAvailable)"

back() { [ "$(meminfo MemTotal)" -ge "$total" ]; }
if ! wait_for 300 back; then say "timeout deflated $(meminfo MemTotal)"; finish; fi
say "deflated $(meminfo MemTotal) $(meminfo MemAvailable)"
finish
