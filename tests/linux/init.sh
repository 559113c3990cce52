#!/bin/busybox sh
# /init of vmmkit's Linux test initramfs (run by busybox as PID 1).
#
# Checks what the guest sees and prints one line per fact, then powers the VM off:
#   VMMKIT-INIT: ok <check>: <what>       a check passed
#   VMMKIT-INIT: FAIL <check>: <what>     a check failed
#   VMMKIT-INIT: skip <check>: <why>      nothing to check (device absent, no address given)
#   VMMKIT-INFO: <check>: <what>          facts that differ between VMMs (transport, sizes)
# The VMMKIT-INIT lines are the same under every VMM given the same devices; tests compare
# them between vmmkit and QEMU.
#
# Arguments (after "--" on the kernel command line): net=<guest ip>/<prefix>,<peer ip>
# (configure eth0 and ping the peer); pattern=<word> (write it to the disk at 1 MiB).

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-INIT: $*"; }
info() { echo "VMMKIT-INFO: $*"; }
failed=0
checks=0
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

say "start: $(uname -sr)"

# -- CPUs ---------------------------------------------------------------------------------
cpus=$(nproc)
online=$(cat /sys/devices/system/cpu/online)
if [ "$cpus" -ge 1 ]; then ok "cpus: $cpus online ($online)"; else fail "cpus: none online"; fi

# -- memory -------------------------------------------------------------------------------
block_size=$(cat /sys/devices/system/memory/block_size_bytes 2>/dev/null)
if [ -n "$block_size" ]; then
    blocks=0
    for state in /sys/devices/system/memory/memory*/state; do
        [ "$(cat "$state")" = online ] && blocks=$((blocks + 1))
    done
    mib=$((blocks * 0x$block_size / 1048576))
    ok "memory: $mib MiB in $blocks online block(s)"
else
    fail "memory: no /sys/devices/system/memory"
fi
info "memtotal: $(grep MemTotal /proc/meminfo | tr -s ' ')"

# -- interrupts ---------------------------------------------------------------------------
serial_irq=$(grep ' ttyS0$' /proc/interrupts | awk '{print $(NF-2), $(NF-1)}')
if [ -n "$serial_irq" ]; then ok "serial: ttyS0 on $serial_irq"; else fail "serial: ttyS0 not in /proc/interrupts"; fi

# -- virtio devices -----------------------------------------------------------------------
names=""
for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev/device" ] || continue
    case "$(cat "$dev/device")" in
        0x0001) kind=net ;;
        0x0002) kind=blk ;;
        0x0003) kind=console ;;
        0x0004) kind=rng ;;
        *) kind="id$(cat "$dev/device")" ;;
    esac
    path=$(readlink -f "$dev")
    case "$path" in
        */pci*) transport=pci ;;
        *) transport=mmio ;;
    esac
    driver=$(basename "$(readlink -f "$dev/driver" 2>/dev/null)" 2>/dev/null)
    info "virtio: $(basename "$dev") $kind over $transport, driver ${driver:-none}"
    names="$names $kind"
    [ -n "$driver" ] || fail "virtio $kind: no driver bound"
done
names=$(echo $names | tr ' ' '\n' | sort | tr '\n' ' ')
if [ -n "$names" ]; then ok "virtio devices: ${names% }"; else say "skip virtio devices: none"; fi

# -- block --------------------------------------------------------------------------------
if [ -b /dev/vda ]; then
    sectors=$(cat /sys/block/vda/size)
    ok "block: vda, $sectors sectors of 512 bytes"
    if [ -n "$PATTERN" ]; then
        # 4 KiB of the pattern, written at 1 MiB, flushed, the cache dropped, read back.
        i=0
        : > /tmp/pattern
        while [ $i -lt 4096 ]; do printf '%s\n' "$PATTERN" >> /tmp/pattern; i=$((i + ${#PATTERN} + 1)); done
        head -c 4096 /tmp/pattern > /tmp/pattern.4k
        dd if=/tmp/pattern.4k of=/dev/vda bs=4096 seek=256 count=1 conv=fsync 2>/dev/null
        blockdev --flushbufs /dev/vda
        dd if=/dev/vda of=/tmp/readback bs=4096 skip=256 count=1 2>/dev/null
        if cmp -s /tmp/pattern.4k /tmp/readback; then
            ok "block: pattern written at 1 MiB and read back"
        else
            fail "block: the pattern read back differs"
        fi
    fi
else
    say "skip block: no /dev/vda"
fi

# -- network ------------------------------------------------------------------------------
if [ -n "$NET" ]; then
    address=${NET%%,*}
    peer=${NET#*,}
    if [ -e /sys/class/net/eth0 ]; then
        ip link set lo up
        ip link set eth0 up
        ip addr add "$address" dev eth0
        info "net: eth0 mac $(cat /sys/class/net/eth0/address) mtu $(cat /sys/class/net/eth0/mtu)"
        replies=$(ping -c 3 -W 5 "$peer" 2>/dev/null | grep -c 'bytes from')
        if [ "$replies" -ge 1 ]; then
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

# -- entropy ------------------------------------------------------------------------------
if [ -c /dev/hwrng ]; then
    rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
    bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)
    if [ "$bytes" -eq 32 ]; then ok "hwrng: 32 bytes from ${rng%%.*}"; else fail "hwrng: read $bytes bytes"; fi
else
    say "skip hwrng: no /dev/hwrng"
fi

# -- console ------------------------------------------------------------------------------
if [ -c /dev/hvc0 ]; then
    echo "VMMKIT-HVC0: hello from hvc0" > /dev/hvc0 && ok "console: wrote to hvc0" || fail "console: hvc0 write failed"
else
    say "skip console: no /dev/hvc0"
fi

# -- RTC ----------------------------------------------------------------------------------
if [ -e /sys/class/rtc/rtc0/date ]; then
    ok "rtc: $(cat /sys/class/rtc/rtc0/name | cut -d' ' -f1), date $(cat /sys/class/rtc/rtc0/date)"
    info "rtc: time $(cat /sys/class/rtc/rtc0/time) UTC"
else
    fail "rtc: no rtc0"
fi

say "done: $checks checks, $failed failed"
sync
poweroff -f
