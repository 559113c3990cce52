"""The host quirks change a guest's command line only for Linux kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmkit_kvm.quirks.payload import is_linux_kernel

GUESTS = Path(__file__).resolve().parents[2] / "guests" / "build" / "x86_64"


def bzimage(version: bytes) -> bytes:
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    image[0x300 : 0x300 + len(version)] = version
    return bytes(image)


@pytest.mark.parametrize("version,linux", [(b"6.1.192 (root@vm) #1", True), (b"vmmkit-selftest v1", False)])
def test_bzimage_kernel_version_decides(tmp_path: Path, version: bytes, linux: bool) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(version))
    assert is_linux_kernel(path) is linux


@pytest.mark.parametrize("content", [b"", b"\x7fELF", b"\x7fELF" + b"\xff" * 60, b"garbage" * 100])
def test_unreadable_or_foreign_files_are_not_linux(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "kernel"
    path.write_bytes(content)
    assert not is_linux_kernel(path)


def test_the_test_guest_is_not_linux() -> None:
    for name in ("selftest.elf", "selftest.bzImage"):
        if not (GUESTS / name).is_file():
            pytest.skip(f"{GUESTS / name} is not built")
        assert not is_linux_kernel(GUESTS / name)


def test_the_shared_linux_kernel_is_linux(shared_dir: Path) -> None:
    assert is_linux_kernel(shared_dir / "guests" / "linux" / "vmlinux")
    assert is_linux_kernel(shared_dir / "guests" / "linux" / "bzImage")
