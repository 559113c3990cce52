"""The initramfs of a nested Linux that checks a passed-through NVMe controller: the nested arm64
Linux's (``lab/linux/nested_initramfs.py``: busybox, the lab kernel's modules loaded by a small
``/init``, which include ``nvme`` and ``nvme_core``) with ``lab/vfio/nvme-init.sh`` as its
``/init.sh`` instead of the Linux tier's checks.

    python3 lab/vfio/nvme_initramfs.py /tmp/nvme.cpio                     # inside the lab
    python3 lab/vfio/nvme_initramfs.py out.cpio --busybox <system>/nested/busybox \\
        --modules <system>/nested/modules --applets-of /bin/busybox        # on the host (QEMU's run)
"""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "lab" / "linux"))
sys.path.insert(0, str(ROOT / "tests" / "linux"))

from initramfs import Entry, applets_named_in, busybox_applets, newc_archive  # noqa: E402
from nested_initramfs import entries as nested_entries  # noqa: E402

INIT = Path(__file__).resolve().parent / "nvme-init.sh"


def entries(busybox: Path, modules: Path, applets_of: Path) -> list[Entry]:
    script = INIT.read_bytes()
    members = [m if m.name != "init.sh" else Entry("init.sh", stat.S_IFREG | 0o755, script)
               for m in nested_entries(busybox, modules, applets_of)]
    present = {m.name for m in members}
    applets = [a for a in busybox_applets(applets_of) if a != "bin/busybox" and a.count("/") in (1, 2)]
    for applet in applets_named_in([script], applets):
        if applet not in present:
            members.insert(-1, Entry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("output", type=Path)
    parser.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    parser.add_argument("--modules", type=Path, default=Path("/lab-modules"))
    parser.add_argument("--applets-of", type=Path, default=None, help="a busybox that runs here (default: --busybox)")
    options = parser.parse_args(argv)
    members = entries(options.busybox, options.modules, options.applets_of or options.busybox)
    options.output.write_bytes(newc_archive(members))
    return 0


if __name__ == "__main__":
    sys.exit(main())
