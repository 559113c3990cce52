#!/bin/sh
# /init for the vsock test (tests/linux/test_linux_vsock.py): busybox sh, PID 1.
#
#   ready                 the guest runs (the host may now hot-add the vsock device)
#   bound                 Linux's virtio vsock transport drove a device; /bin/vsock-test runs
#                         (vsock_guest.c: its own "VMMKIT-VSOCK:" lines)
#   exit <status>         vsock-test ended; the VM powers off
#   timeout bound         no vsock device within 240 s
# Arguments (after "--") go to vsock-test: listen=, streams=, out=, bytes=, refused=

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-VSOCK: $*"; }

bound() {
    for dev in /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio*; do
        [ -e "$dev" ] && return 0
    done
    return 1
}

say "ready"
limit=1200
while ! bound; do
    limit=$((limit - 1))
    if [ "$limit" -le 0 ]; then say "timeout bound"; poweroff -f; fi
    sleep 0.2
done
say "bound"
/bin/vsock-test "$@"
say "exit $?"
poweroff -f
