#!/bin/sh
# /init of vmmkit's Linux test initramfs (busybox sh, PID 1).
#
# Checks what the guest sees, prints one line per fact, then powers the VM off:
#   VMMKIT-INIT: ok <check>: <what>       a check passed
#   VMMKIT-INIT: FAIL <check>: <what>     a check failed
#   VMMKIT-INIT: skip <check>: <why>      nothing to check (device absent, no address given)
#   VMMKIT-INFO: <check>: <what>          facts that may differ between VMMs (sizes, times)
# The VMMKIT-INIT lines are the same under every VMM given the same devices: tests compare
# vmmkit's with QEMU's.
#
# Arguments (after "--" on the kernel command line):
#   net=<address>/<prefix>,<peer>   configure eth0 and ping the peer
#   pattern=<word>                  write 4 KiB of "<word>\n" to the disk at 1 MiB, read it back
#
# Written for a slow guest: every fork costs (page faults, exec), so files are read with the
# shell's own "read" and paths resolved with "cd -P" instead of cat, readlink or $(...).

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

failed=0
checks=0
say() { echo "VMMKIT-INIT: $*"; }
info() { echo "VMMKIT-INFO: $*"; }
ok() { checks=$((checks + 1)); say "ok $*"; }
fail() { checks=$((checks + 1)); failed=$((failed + 1)); say "FAIL $*"; }

NET=""
PATTERN=""
for arg in "$@"; do
    case "$arg" in
        net=*) NET="${arg#net=}" ;;
        pattern=*) PATTERN="${arg#pattern=}" ;;
    esac
done

read -r _ _ release _ < /proc/version
say "start: Linux $release"

# -- CPUs: count the ranges of /sys/devices/system/cpu/online ("0-1", "0,2-3") -------------
read -r online < /sys/devices/system/cpu/online
cpus=0
IFS=,
for range in $online; do
    first=${range%-*}
    last=${range#*-}
    cpus=$((cpus + last - first + 1))
done
unset IFS
if [ "$cpus" -ge 1 ]; then ok "cpus: $cpus online ($online)"; else fail "cpus: none online"; fi

# -- memory: online memory blocks (the RAM the firmware described, in block units) ----------
if read -r block_size < /sys/devices/system/memory/block_size_bytes 2>/dev/null; then
    blocks=0
    for state_file in /sys/devices/system/memory/memory*/state; do
        read -r state < "$state_file"
        [ "$state" = online ] && blocks=$((blocks + 1))
    done
    ok "memory: $((blocks * 0x$block_size / 1048576)) MiB in $blocks online block(s)"
else
    fail "memory: no /sys/devices/system/memory"
fi
echo -n "VMMKIT-INFO: memtotal: "
grep -m 1 MemTotal /proc/meminfo

# -- the serial port's interrupt: the controller, pin and trigger behind Linux's IRQ number --
# (ttyS0, a 16550; ttyAMA0 on arm64, a PL011)
serial=ttyS0
[ -e /sys/class/tty/ttyAMA0 ] && serial=ttyAMA0
if read -r irq < /sys/class/tty/$serial/irq 2>/dev/null && [ -d "/sys/kernel/irq/$irq" ]; then
    read -r chip < "/sys/kernel/irq/$irq/chip_name"
    read -r pin < "/sys/kernel/irq/$irq/hwirq"
    read -r trigger < "/sys/kernel/irq/$irq/type"
    info "serial: $serial is Linux IRQ $irq"
    ok "serial: $serial on $chip pin $pin, $trigger"
else
    fail "serial: no interrupt for $serial"
fi

# -- virtio devices: kind, transport, driver -----------------------------------------------
found=" "
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev/device" ] || continue
    read -r id < "$dev/device"
    case "$id" in
        0x0001) kind=net ;;
        0x0002) kind=blk ;;
        0x0003) kind=console ;;
        0x0004) kind=rng ;;
        *) kind="device-$id" ;;
    esac
    cd -P "$dev"
    case "$PWD" in
        */pci0000:*) transport=pci ;;
        *) transport=mmio ;;
    esac
    driver=none
    cd -P "$dev/driver" 2>/dev/null && driver=${PWD##*/}
    cd /
    info "virtio: ${dev##*/} $kind over $transport, driver $driver"
    found="$found$kind "
    [ "$driver" = none ] && fail "virtio $kind: no driver bound"
done
names=""
for kind in blk console net rng; do
    case "$found" in *" $kind "*) names="$names $kind" ;; esac
done
if [ -n "$names" ]; then ok "virtio devices:$names"; else say "skip virtio devices: none"; fi

# -- block ---------------------------------------------------------------------------------
if [ -b /dev/vda ]; then
    read -r sectors < /sys/block/vda/size
    ok "block: vda, $sectors sectors of 512 bytes"
    if [ -n "$PATTERN" ]; then
        block="$PATTERN
"
        while [ ${#block} -lt 4096 ]; do block="$block$block"; done
        printf '%s' "${block:0:4096}" > /tmp/pattern
        # 4 KiB at 1 MiB, flushed to the device, the page cache dropped, read back.
        dd if=/tmp/pattern of=/dev/vda bs=4096 seek=256 count=1 conv=fsync 2>/dev/null
        blockdev --flushbufs /dev/vda
        dd if=/dev/vda of=/tmp/readback bs=4096 skip=256 count=1 2>/dev/null
        if cmp -s /tmp/pattern /tmp/readback; then
            ok "block: pattern written at 1 MiB and read back"
        else
            fail "block: the pattern read back differs"
        fi
    fi
    queues=0
    for queue in /sys/block/vda/mq/*; do [ -d "$queue" ] && queues=$((queues + 1)); done
    # blk-mq gives each CPU its own queue: a write flushed from each CPU goes down each queue
    # (at 2 MiB + 4 KiB * cpu; the host checks them). One queue: no line (the lab's checks).
    [ "$queues" -gt 1 ] && ok "block: $queues request queues"
    if [ "$queues" -gt 1 ] && [ -n "$PATTERN" ]; then
        cpu=0
        while [ "$cpu" -lt "$queues" ]; do
            taskset -c "$cpu" dd if=/tmp/pattern of=/dev/vda bs=4096 seek=$((512 + cpu)) count=1 conv=fsync 2>/dev/null
            cpu=$((cpu + 1))
        done
        blockdev --flushbufs /dev/vda
        cpu=0
        same=yes
        while [ "$cpu" -lt "$queues" ]; do
            dd if=/dev/vda of=/tmp/readback bs=4096 skip=$((512 + cpu)) count=1 2>/dev/null
            cmp -s /tmp/pattern /tmp/readback || same=no
            cpu=$((cpu + 1))
        done
        if [ "$same" = yes ]; then
            ok "block: a write from each CPU's queue read back"
        else
            fail "block: a write from some CPU's queue read back differs"
        fi
    fi
else
    say "skip block: no /dev/vda"
fi

# -- network -------------------------------------------------------------------------------
if [ -n "$NET" ]; then
    address=${NET%%,*}
    peer=${NET#*,}
    if [ -e /sys/class/net/eth0 ]; then
        read -r mac < /sys/class/net/eth0/address
        ip link set eth0 up
        ip addr add "$address" dev eth0
        info "net: eth0 mac $mac"
        if ping -c 1 -W 5 "$peer" > /dev/null 2>&1; then
            ok "net: eth0 $address, ping $peer answered"
        else
            fail "net: eth0 $address, no answer from $peer"
        fi
    else
        fail "net: no eth0"
    fi
else
    say "skip net: no address given"
fi

# -- entropy -------------------------------------------------------------------------------
if [ -c /dev/hwrng ]; then
    read -r rng < /sys/class/misc/hw_random/rng_current
    if dd if=/dev/hwrng of=/tmp/random bs=32 count=1 2>/dev/null && [ -s /tmp/random ]; then
        ok "hwrng: read from ${rng%%.*}"
    else
        fail "hwrng: nothing read from ${rng%%.*}"
    fi
else
    say "skip hwrng: no /dev/hwrng"
fi

# -- virtio console ------------------------------------------------------------------------
if [ -c /dev/hvc0 ]; then
    if echo "VMMKIT-HVC0: hello from hvc0" > /dev/hvc0; then ok "console: wrote to hvc0"; else fail "console: write to hvc0 failed"; fi
else
    say "skip console: no /dev/hvc0"
fi

# -- RTC -----------------------------------------------------------------------------------
if read -r name _ < /sys/class/rtc/rtc0/name 2>/dev/null; then
    read -r date < /sys/class/rtc/rtc0/date
    read -r time < /sys/class/rtc/rtc0/time
    ok "rtc: $name, date $date"
    info "rtc: time $time UTC"
else
    fail "rtc: no rtc0"
fi

say "done: $checks checks, $failed failed"
poweroff -f
