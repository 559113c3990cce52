#!/bin/sh
# /init for tests/integration/test_vhost_user_net_linux.py: busybox sh, PID 1, Linux's virtio_net
# on a vhost-user-net device served by vmmkit-vhost-user net (QEMU TCG the frontend). The host
# side of the tap is 10.0.7.1 with an HTTP server (GET /blob, POST /up answers the sha256 of the
# body). Every result is a "VMMKIT-NET: " line on the serial console; the host checks them.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-NET: $*"; }

say "features $(cat /sys/class/net/eth0/device/features)"
ip link set eth0 up
ip addr add 10.0.7.2/24 dev eth0
if ping -c 3 -W 5 10.0.7.1 >/dev/null; then say "ping ok"; else say "ping FAILED"; fi
say "get $(wget -q -O - http://10.0.7.1:8080/blob | sha256sum)"
# busybox wget posts a file as a C string: random bytes without NULs (base64), 3,000,000 of them
head -c 2250000 /dev/urandom | base64 | tr -d '\n' > /tmp/up
say "up $(sha256sum /tmp/up)"
say "posted $(wget -q -O - --post-file /tmp/up http://10.0.7.1:8080/up)"
say "stats $(cat /sys/class/net/eth0/statistics/rx_packets) $(cat /sys/class/net/eth0/statistics/tx_packets)"
say "done"
poweroff -f
