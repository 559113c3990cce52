"""vmmkit's Linux test initramfs: Debian's static busybox plus ``init.sh`` as ``/init``,
written as an uncompressed cpio archive in the kernel's "newc" format.

    python tests/linux/initramfs.py /tmp/vmmkit-init.cpio     # build one by hand

The archive is deterministic (fixed inode numbers, mtime 0, owner root), so the same inputs
always give the same bytes.
"""

from __future__ import annotations

import argparse
import re
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
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


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Where each applet of ``busybox`` belongs (``bin/sh``, ``usr/bin/awk``...), as busybox
    itself says (``--list-full``)."""
    result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    return sorted({line.strip().lstrip("/") for line in result.stdout.splitlines() if line.strip()})


def applets_named_in(scripts: Iterable[bytes], applets: Iterable[str]) -> list[str]:
    """The applets (``bin/mount``...) whose name is a word of any of ``scripts``: the commands
    the scripts may run (and some words that are not commands, which costs one link each)."""
    words = {word.decode() for script in scripts for word in re.findall(rb"[A-Za-z0-9_.+\[-]+", script)}
    return [applet for applet in applets if applet.rsplit("/", 1)[-1] in words]


def initramfs_entries(busybox: Path = BUSYBOX, init: Path = INIT_SCRIPT, *,
                      scripts: Sequence[bytes] = ()) -> list[Entry]:
    """The members of the test initramfs: busybox, a link for each applet that ``init`` or
    ``scripts`` (other scripts of the archive) name, ``/dev/console`` for init's output, and
    ``/init``.

    Links are made here, not by ``busybox --install`` at boot, and only for the applets the
    scripts use: the guest kernel is emulated instruction by instruction on a kvm_pvm host,
    where unpacking a link for each of busybox's 269 applets takes ~10 s of every boot. (Without
    a link busybox's shell still finds an applet, but runs it through ``/proc/self/exe``: not
    before ``/proc`` is mounted.)"""
    directory = stat.S_IFDIR | 0o755
    entries = [Entry(name, directory) for name in ("bin", "dev", "proc", "sbin", "sys", "usr", "usr/bin", "usr/sbin")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("tmp", stat.S_IFDIR | 0o1777),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
    ]
    init_script = init.read_bytes()
    applets = [a for a in busybox_applets(busybox) if a != "bin/busybox" and a.count("/") in (1, 2)]
    for applet in applets_named_in([init_script, b"sh", *scripts], applets):
        entries.append(Entry(applet, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    entries.append(Entry("init", stat.S_IFREG | 0o755, init_script))
    return entries


def missing_busybox_reason(busybox: Path = BUSYBOX) -> str | None:
    """Why the initramfs cannot be built here, or ``None`` if it can."""
    if not busybox.is_file():
        return f"{busybox} not found (apt-get install busybox-static)"
    header = busybox.read_bytes()[:4096]
    if b"/lib64/ld-linux" in header or b"/lib/ld-linux" in header:
        return f"{busybox} is dynamically linked; the initramfs needs busybox-static"
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
