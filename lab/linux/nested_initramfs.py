"""The initramfs of the nested arm64 Linux (run inside the AArch64 lab): the Linux tier's
(``tests/linux/initramfs.py``: static busybox, ``tests/linux/init.sh``) plus the lab kernel's
virtio modules, loaded by a small ``/init`` before it runs the tier's checks as ``/init.sh``.

    python3 lab/linux/nested_initramfs.py /tmp/nested.cpio

Debian's arm64 kernel has virtio-mmio, -blk, -net and -rng as modules; the lab's ``/init``
already copied them, with what they depend on and in load order, to ``/lab-modules``.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "linux"))

from initramfs import INIT_SCRIPT, Entry, initramfs_entries, newc_archive  # noqa: E402

MODULES = Path("/lab-modules")
WRAPPER = b"""#!/bin/sh
while read -r module; do insmod "/modules/$module"; done < /modules/order
exec /bin/sh /init.sh "$@"
"""


def entries() -> list[Entry]:
    members = [e for e in initramfs_entries() if e.name != "init"]
    members.append(Entry("modules", stat.S_IFDIR | 0o755))
    order = (MODULES / "order").read_text().split()
    for name in order:
        members.append(Entry(f"modules/{name}", stat.S_IFREG | 0o644, (MODULES / name).read_bytes()))
    members.append(Entry("modules/order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode()))
    members.append(Entry("init.sh", stat.S_IFREG | 0o755, INIT_SCRIPT.read_bytes()))
    members.append(Entry("init", stat.S_IFREG | 0o755, WRAPPER))
    return members


def main() -> int:
    Path(sys.argv[1]).write_bytes(newc_archive(entries()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
