"""The initramfs of the nested arm64 Linux: the Linux tier's (``tests/linux/initramfs.py``:
static busybox, ``tests/linux/init.sh``) plus the lab kernel's virtio modules, loaded by a small
``/init`` before it runs the tier's checks as ``/init.sh``.

    python3 lab/linux/nested_initramfs.py /tmp/nested.cpio          # inside the AArch64 lab
    python3 lab/linux/nested_initramfs.py out.cpio --busybox <system>/nested/busybox \\
        --modules <system>/nested/modules --applets-of /bin/busybox  # on the host (QEMU's peer run)
    python3 lab/linux/nested_initramfs.py /tmp/nvme.cpio --init-sh lab/vfio/nvme-init.sh  # other checks

Debian's arm64 kernel has virtio-mmio, -blk, -net and -rng as modules; the lab keeps them, with
what they depend on and in load order, in ``/lab-modules`` (and ``<system>/nested/modules`` on
the host). On the host the arm64 busybox cannot run to list its applets: the host's busybox of
the same Debian version (``--applets-of``) lists them.
"""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "linux"))

from initramfs import INIT_SCRIPT, Entry, initramfs_entries, newc_archive  # noqa: E402

#: After the modules (the virtio drivers probed their devices, virtio-blk read its partition
#: table), the message-signalled interrupts and the virtio ones of /proc/interrupts, each as a
#: "VMMKIT-IRQ:" line: which controller (GICv3 SPI, ITS MSI) delivered how many; then every PCI
#: function's assigned resources (sysfs ``resource``: BARs 0-5, the ROM, bridge windows) as
#: "VMMKIT-BAR: <bdf> <vendor>:<device> <index> <start> <end> <flags>": where Linux put them.
WRAPPER = b"""#!/bin/sh
while read -r module; do insmod "/modules/$module"; done < /modules/order
mount -t proc proc /proc
grep -E 'MSI|virtio' /proc/interrupts | while read -r line; do echo "VMMKIT-IRQ: $line"; done
umount /proc
mount -t sysfs sysfs /sys
for dev in /sys/bus/pci/devices/*; do
    [ -r "$dev/resource" ] || continue
    bar=0
    while read -r start end flags; do
        [ "$start" = 0x0000000000000000 ] || \
            echo "VMMKIT-BAR: ${dev##*/} $(cat "$dev/vendor"):$(cat "$dev/device") $bar $start $end $flags"
        bar=$((bar + 1))
    done < "$dev/resource"
done
umount /sys
exec /bin/sh /init.sh "$@"
"""


def entries(busybox: Path, modules: Path, applets_of: Path, init_sh: Path = INIT_SCRIPT) -> list[Entry]:
    """The archive's members; ``init_sh`` is the checks the wrapper runs (the Linux tier's by default)."""
    members = []
    for entry in initramfs_entries(busybox=applets_of, init=init_sh, scripts=[WRAPPER]):
        if entry.name == "init":
            continue
        if entry.name == "bin/busybox":
            entry = Entry(entry.name, entry.mode, busybox.read_bytes())
        members.append(entry)
    members.append(Entry("modules", stat.S_IFDIR | 0o755))
    order = (modules / "order").read_text().split()
    for name in order:
        members.append(Entry(f"modules/{name}", stat.S_IFREG | 0o644, (modules / name).read_bytes()))
    members.append(Entry("modules/order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode()))
    members.append(Entry("init.sh", stat.S_IFREG | 0o755, init_sh.read_bytes()))
    members.append(Entry("init", stat.S_IFREG | 0o755, WRAPPER))
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("output", type=Path)
    parser.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    parser.add_argument("--modules", type=Path, default=Path("/lab-modules"))
    parser.add_argument("--applets-of", type=Path, default=None, help="a busybox that runs here (default: --busybox)")
    parser.add_argument("--init-sh", type=Path, default=INIT_SCRIPT,
                        help="the checks /init runs after loading the modules (default: the Linux tier's)")
    options = parser.parse_args(argv)
    members = entries(options.busybox, options.modules, options.applets_of or options.busybox, options.init_sh)
    options.output.write_bytes(newc_archive(members))
    return 0


if __name__ == "__main__":
    sys.exit(main())
