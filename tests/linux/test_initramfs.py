"""The test initramfs builder: a correct "newc" cpio, and an /init busybox can parse. Fast."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from initramfs import (
    BUSYBOX,
    INIT_SCRIPT,
    Entry,
    applets_named_in,
    build_initramfs,
    missing_busybox_reason,
    newc_archive,
)
from linuxboot import block_pattern

SAMPLE = [
    Entry("dir", stat.S_IFDIR | 0o755),
    Entry("dir/file", stat.S_IFREG | 0o644, b"hello\n"),
    Entry("dir/odd", stat.S_IFREG | 0o600, b"x" * 5),
    Entry("link", stat.S_IFLNK | 0o777, b"dir/file"),
    Entry("console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
]


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A reader written from the format's description, to check the writer against."""
    out = []
    offset = 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701", header[:6]
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdev = fields[1], fields[6], (fields[9], fields[10])
        namesize = fields[11]
        name = data[offset + 110 : offset + 110 + namesize - 1].decode()
        assert data[offset + 110 + namesize - 1] == 0
        offset += 110 + namesize
        offset += -offset % 4
        content = data[offset : offset + filesize]
        offset += filesize
        offset += -offset % 4
        if name == "TRAILER!!!":
            assert offset == len(data)
            return out
        out.append((name, mode, content, rdev))


def test_newc_archive_layout() -> None:
    data = newc_archive(SAMPLE)
    assert len(data) % 4 == 0
    parsed = parse_newc(data)
    assert [(e.name, e.mode, e.data, e.rdev) for e in SAMPLE] == parsed
    assert newc_archive(SAMPLE) == data  # deterministic


def gnu_cpio() -> bool:
    """``cpio`` is GNU's (busybox's, as in the x86-64 lab, lists no device numbers)."""
    if shutil.which("cpio") is None:
        return False
    version = subprocess.run(["cpio", "--version"], capture_output=True, text=True)
    return "GNU cpio" in version.stdout


@pytest.mark.skipif(not gnu_cpio(), reason="GNU cpio is not installed (apt-get install cpio)")
def test_gnu_cpio_reads_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "sample.cpio"
    archive.write_bytes(newc_archive(SAMPLE))
    listing = subprocess.run(["cpio", "-itv", "-F", str(archive)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.stdout.splitlines()]
    assert names == ["dir", "dir/file", "dir/odd", "link", "console"]
    assert "5,   1" in listing.stdout or "5, 1" in listing.stdout
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "-F", str(archive)], cwd=out, check=True,
                   capture_output=True)
    assert (out / "dir" / "file").read_bytes() == b"hello\n"
    assert (out / "link").readlink() == Path("dir/file")


@pytest.fixture
def busybox() -> Path:
    reason = missing_busybox_reason()
    if reason:
        pytest.skip(reason)
    return BUSYBOX


def test_initramfs_holds_busybox_its_applets_and_init(busybox: Path, tmp_path: Path) -> None:
    path = build_initramfs(tmp_path / "init.cpio", busybox)
    members = {name: (mode, content) for name, mode, content, _ in parse_newc(path.read_bytes())}
    assert members["init"] == (stat.S_IFREG | 0o755, INIT_SCRIPT.read_bytes())
    assert members["bin/busybox"][1] == busybox.read_bytes()
    assert stat.S_ISCHR(members["dev/console"][0])
    for applet in ("bin/sh", "sbin/ip", "bin/dd", "sbin/poweroff", "bin/ping", "bin/mount"):
        mode, target = members[applet]
        assert stat.S_ISLNK(mode) and target == b"/bin/busybox", applet
    assert "bin/vi" not in members and "usr/bin/awk" not in members  # init.sh runs neither
    before = path.stat().st_mtime_ns
    build_initramfs(path, busybox)  # unchanged content: the file is left alone
    assert path.stat().st_mtime_ns == before


def test_init_script_parses(busybox: Path) -> None:
    result = subprocess.run([str(busybox), "sh", "-n", str(INIT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_init_writes_the_pattern_the_host_expects(busybox: Path, tmp_path: Path) -> None:
    """The block-building lines of init.sh, run by the host's busybox, give block_pattern()."""
    script = INIT_SCRIPT.read_text()
    start = script.index('        block="$PATTERN')
    end = script.index("/tmp/pattern\n", start) + len("/tmp/pattern\n")
    snippet = script[start:end].replace("/tmp/pattern", str(tmp_path / "pattern"))
    subprocess.run([str(busybox), "sh", "-c", f"PATTERN=some-word\n{snippet}"], check=True)
    assert (tmp_path / "pattern").read_bytes() == block_pattern("some-word")


def test_links_are_made_for_the_applets_a_script_names() -> None:
    script = b"mount -t proc proc /proc\nif grep -q x /f; then echo ok | tee /dev/null; fi\n[ -e /x ] && poweroff -f\n"
    applets = ["bin/mount", "bin/grep", "bin/echo", "usr/bin/tee", "sbin/poweroff", "usr/bin/[", "bin/vi",
               "usr/bin/awk"]
    assert applets_named_in([script], applets) == ["bin/mount", "bin/grep", "bin/echo", "usr/bin/tee",
                                                   "sbin/poweroff", "usr/bin/["]
    assert applets_named_in([b"# nothing but a comment about vi\n"], applets) == ["bin/vi"]  # words, not syntax
