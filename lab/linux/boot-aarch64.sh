#!/bin/sh
# Inside the AArch64 lab (lab/README.md): boot Debian's arm64 kernel - the lab's own, carried in
# with `lab.py run --add kernel` - on vmmkit's KVM backend with virtio-blk, virtio-net (a tap in
# the lab, vmmkit gives it the peer address) and virtio-rng. The nested /init is the
# Linux tier's (tests/linux/init.sh); its lines are printed, then "nested-disk: <word>" from the
# disk image (the pattern /init wrote). Exit status: vmmkit's. The virtio devices go on the VM's
# default transport, PCI on KVM with the GICv3 ITS (MSI-X); TRANSPORT=mmio|pci chooses
# (--platform virtio_transport=). NET=off leaves virtio-net out.
#
#     lab/run --add kernel -- env TRANSPORT=mmio sh lab/linux/boot-aarch64.sh
#     lab/run --add kernel -- env NET=off sh lab/linux/boot-aarch64.sh       # PCI, the default
set -e
kernel=${KERNEL:-/lab/files/Image}
python3 lab/linux/nested_initramfs.py /tmp/nested.cpio
rm -f /tmp/nested-disk.img
truncate -s 8M /tmp/nested-disk.img
set +e
set -- --net tap=vmmtap0,ip=192.168.127.1,mask=255.255.255.0
guest_net=net=192.168.127.2/24,192.168.127.1
if [ "${NET:-on}" = off ]; then set --; guest_net=; fi
if [ -n "${TRANSPORT:-}" ]; then set -- "$@" --platform "virtio_transport=$TRANSPORT"; fi
vmmkit --hypervisor kvm --kernel "$kernel" --initramfs /tmp/nested.cpio --memory "${MEMORY:-size=256M}" --cpus boot=2 \
    --disk path=/tmp/nested-disk.img "$@" --rng src=/dev/urandom \
    --cmdline "console=ttyAMA0 quiet -- $guest_net pattern=vmmkit-arm64-pattern"
status=$?
echo "nested-disk: $(dd if=/tmp/nested-disk.img bs=4096 skip=256 count=1 2>/dev/null | head -n 1)"
exit $status
