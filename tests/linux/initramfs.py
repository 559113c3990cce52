"""vmmkit's Linux test initramfs: Debian's static busybox plus ``init.sh`` as ``/init``,
written as an uncompressed cpio archive in the kernel's "newc" format.

    python tests/linux/initramfs.py /tmp/vmmkit-init.cpio     # build one by hand

The archive is deterministic (fixed inode numbers, mtime 0, owner root), so the same inputs
always give the same bytes.
"""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
#: Where Debian's ``busybox-static`` puts the binary.
BUSYBOX = Path("/bin/busybox")
NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@frozen
class Entry:
    """One archive member: ``mode`` carries the type bits (``stat.S_IFDIR | 0o755``...)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """The entries as a "newc" (SVR4, no CRC) cpio archive, with its trailer."""
    out = bytearray()
    members = [*entries, Entry(TRAILER, 0)]
    for ino, entry in enumerate(members, start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino if entry.name != TRAILER else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink if entry.name != TRAILER else 1,
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = NEWC_MAGIC + b"".join(f"{value:08x}".encode() for value in fields)
        out += header + name
        out += _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def initramfs_entries(busybox: Path = BUSYBOX, init: Path = INIT_SCRIPT) -> list[Entry]:
    """The members of the test initramfs: busybox, ``/bin/sh`` (the scripts' interpreter),
    ``/dev/console`` for init's output, and ``/init``.

    No link for the other applets: the guest's kernel is emulated instruction by instruction on
    a kvm_pvm host, where unpacking 269 symlinks costs ~10 s of every boot. Debian's static
    busybox runs applets by name without them (its shell is built "standalone", preferring
    applets; :func:`missing_busybox_reason` checks it)."""
    directory = stat.S_IFDIR | 0o755
    entries = [Entry(name, directory) for name in ("bin", "dev", "proc", "sbin", "sys", "usr", "usr/bin", "usr/sbin")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("tmp", stat.S_IFDIR | 0o1777),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        Entry("init", stat.S_IFREG | 0o755, init.read_bytes()),
    ]
    return entries


def missing_busybox_reason(busybox: Path = BUSYBOX) -> str | None:
    """Why the initramfs cannot be built here, or ``None`` if it can."""
    if not busybox.is_file():
        return f"{busybox} not found (apt-get install busybox-static)"
    header = busybox.read_bytes()[:4096]
    if b"/lib64/ld-linux" in header or b"/lib/ld-linux" in header:
        return f"{busybox} is dynamically linked; the initramfs needs busybox-static"
    probe = subprocess.run([str(busybox), "sh", "-c", "PATH=/nonexistent; cat /dev/null"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{busybox}'s shell does not run applets without links (built without SH_STANDALONE)"
    return None


def build_initramfs(path: Path, busybox: Path = BUSYBOX, init: Path = INIT_SCRIPT) -> Path:
    """Write the test initramfs to ``path`` (only if its content changed) and return it."""
    data = newc_archive(initramfs_entries(busybox, init))
    path = Path(path)
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the cpio archive")
    parser.add_argument("--busybox", type=Path, default=BUSYBOX, help="a static busybox binary")
    args = parser.parse_args(argv)
    reason = missing_busybox_reason(args.busybox)
    if reason:
        print(f"initramfs: {reason}", file=sys.stderr)
        return 1
    print(build_initramfs(args.output, args.busybox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
