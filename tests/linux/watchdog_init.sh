#!/bin/sh
# /init for the watchdog test (tests/linux/test_linux_watchdog.py): busybox sh, PID 1.
# Every boot asks the i6300esb driver how the last reset happened ("bootstatus", from the
# device's timed-out flag). A fresh boot then arms the watchdog, pets it a few times and stops:
# the VMM must reset the VM. The boot after that reset reports bootstatus 32 (WDIOF_CARDRESET)
# and powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
status=$(/bin/wdt status)
echo "$status"
case "$status" in
    *"bootstatus 32 "*) echo "VMMKIT-WDT: done"; poweroff -f ;;
esac
/bin/wdt arm 2 8
# the guest is hung as far as the watchdog can tell: wait (bounded) for the reset
sleep 60
echo "VMMKIT-WDT: no reset"
poweroff -f
