#!/bin/sh
# /init for the virtio-fs tests (tests/integration/test_vhost_user_fs_qemu.py under QEMU TCG,
# tests/linux/test_linux_virtiofs.py under vmmkit): busybox sh, PID 1, with a vhost-user-fs
# device (tag "myfs") served by vmmkit-vhost-user fs. Every result is a "VMMKIT-FS: " line on the
# serial console; the host checks them and the shared directory (virtiofs_share.py).

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VMMKIT-FS: $*"; }
check() { if "$@"; then say "ok $*"; else say "FAILED($?) $*"; fi; }

mkdir -p /mnt
if ! mount -t virtiofs myfs /mnt; then say "FAILED mount"; poweroff -f; fi
say "mounted"
for name in $(ls -a /mnt); do say "ls $name"; done
say "hello $(cat /mnt/hello.txt)"
say "big $(md5sum /mnt/big.bin)"
check sh -c 'echo "written by linux" > /mnt/guest.txt'
check sync /mnt/guest.txt
check sh -c 'head -c 300000 /mnt/big.bin > /mnt/copy.bin'
check sync /mnt/copy.bin
check mkdir /mnt/newdir
check sh -c 'echo moved > /mnt/newdir/before.txt'
check mv /mnt/newdir/before.txt /mnt/newdir/after.txt
check mv /mnt/rename-me.txt /mnt/newdir/renamed.txt
check rm /mnt/delete-me.txt
check rmdir /mnt/empty-dir
check truncate -s 5 /mnt/truncate-me.txt
check chmod 640 /mnt/guest.txt
check touch -d "2001-02-03 04:05:06" /mnt/hello.txt
check ln -s /etc/passwd /mnt/guest-symlink
check ln /mnt/guest.txt /mnt/guest-hardlink
say "readlink $(readlink /mnt/guest-symlink)"
say "df $(df /mnt | tail -n 1)"
say "stat $(stat -c '%s %a' /mnt/guest.txt)"
# Escapes: the share holds "escape" -> / and "up" -> .. (made on the host); the guest resolves
# them in its own namespace, and the daemon never follows them.
for name in $(ls /mnt/escape/); do say "escape-ls $name"; done
if cat /mnt/up/outside-secret.txt 2>/dev/null; then say "ESCAPED up"; else say "ok no up"; fi
if cat /mnt/../outside-secret.txt 2>/dev/null; then say "ESCAPED dotdot"; else say "ok no dotdot"; fi
# Forget the guest's dentries and inodes: the daemon hears FORGET / BATCH_FORGET.
check sh -c 'echo 3 > /proc/sys/vm/drop_caches'
for name in $(ls /mnt/newdir); do say "newdir $name"; done
say "after-forget $(cat /mnt/newdir/after.txt)"
check sync
check umount /mnt
say "done"
poweroff -f
