"""virtio-pmem judged by Linux's ``virtio_pmem`` driver and ext4 with DAX: the host makes an
ext4 image (``mkfs.ext4`` of a file, no journal so that what the guest syncs is in place),
puts ``host.txt`` in it (``debugfs -w``) and boots the team's kernel with ``--pmem
file=<image>``. ``pmem_init.sh`` (``/init``) waits for ``/dev/pmem0``, mounts it ``-o dax``,
reads ``host.txt``, writes ``guest.txt`` and ``sync``s: the FLUSH request. The host then reads
``guest.txt`` out of the image file with ``debugfs`` while the VM still runs, and the device's
``flushes`` counter (``vm.counters``) says the flush came. The guest unmounts; the host removes
the device (``vm.remove-device``: ACPI PCI hot-remove, the region leaves the guest) and the
guest sees ``/dev/pmem0`` go.

The same initramfs under QEMU's ``virtio-pmem-pci`` (TCG) is the reference that the guest
side (this init script, the kernel's configuration) is right.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from initramfs import initramfs_entries, missing_busybox_reason, newc_archive
from linuxboot import BASE_CMDLINE, LINUX_DIR, QEMU, Boot, linux_missing_reason, scaled_timeout

from vmmkit.api.client import ApiClient
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-PMEM: "
IMAGE_SIZE = 32 << 20
HOST_TEXT = "written by the host with debugfs"
GUEST_TEXT = "written by the guest through DAX"
#: One boot (~50-90 s to /init on an idle kvm_pvm host, several minutes on the shared
#: development machine), the mount and a PCI hot-remove; ``VMMKIT_LINUX_TIMEOUT_FACTOR``
#: stretches it on a loaded host.
TIMEOUT = scaled_timeout(600.0)


def _tools_missing_reason() -> str | None:
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (e2fsprogs)"
    return None


def make_image(path: Path) -> None:
    """A 32 MiB ext4 file system without a journal, 4 KiB blocks (DAX needs page-sized
    blocks), with ``host.txt``."""
    with path.open("wb") as image:
        image.truncate(IMAGE_SIZE)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-O", "^has_journal", str(path)], check=True,
                   capture_output=True)
    source = path.parent / "host.txt"
    source.write_text(HOST_TEXT + "\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {source} host.txt", str(path)], check=True, capture_output=True)


def read_from_image(image: Path, name: str) -> str:
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, text=True)
    return result.stdout


def build_initramfs(directory: Path) -> Path:
    path = directory / "pmem.cpio"
    path.write_bytes(newc_archive(initramfs_entries(init=HERE / "pmem_init.sh")))
    return path


class Console:
    """The guest's ``VMMKIT-PMEM:`` lines, read step by step."""

    def __init__(self, boot: Boot) -> None:
        self.boot = boot
        self.seen = 0

    def step(self, name: str, deadline: float) -> str:
        while time.monotonic() < deadline:
            lines = self.boot.result.lines
            while self.seen < len(lines):
                _, line = lines[self.seen]
                self.seen += 1
                if PREFIX in line:
                    said = line.split(PREFIX, 1)[1]
                    word, _, rest = said.partition(" ")
                    assert word == name, f"expected {name!r}, the guest said {said!r}\n{self.boot.result.describe()}"
                    return rest
            if self.boot._proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {name!r} from the guest\n{self.boot.wait().describe()}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmmkit-pmem-", dir="/tmp"))  # AF_UNIX paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _skip_unless_ready(*extra: str | None) -> None:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), _tools_missing_reason(), *extra):
        if reason:
            pytest.skip(reason)


@pytest.mark.requires_kvm
def test_linux_mounts_ext4_with_dax_on_vmmkit_pmem(workdir: Path) -> None:
    _skip_unless_ready(kvm_unusable_reason())
    image = workdir / "pmem.img"
    make_image(image)
    api_path = workdir / "api.sock"
    boot = Boot("pmem", [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(build_initramfs(workdir)), "--cpus", "boot=1", "--memory", "size=128M",
        "--serial", "tty", "--console", "off", "--platform", "virtio_transport=pci",
        "--pmem", f"file={image},id=pm0", "--cmdline", f"{BASE_CMDLINE} -- remove",
        "--api-socket", f"path={api_path}",
    ], timeout=TIMEOUT)
    try:
        console = Console(boot)
        deadline = time.monotonic() + TIMEOUT
        assert console.step("found", deadline) == str(IMAGE_SIZE // 512)
        assert "dax" in console.step("mounted", deadline)
        assert console.step("host-file", deadline) == HOST_TEXT
        console.step("synced", deadline)
        api = ApiClient(str(api_path), timeout=90)
        counters = api.counters()["pm0"]
        assert counters["flushes"] >= 1 and counters["flush_errors"] == 0 and counters["bad_requests"] == 0, counters
        assert read_from_image(image, "guest.txt") == GUEST_TEXT + "\n"
        console.step("unmounted", deadline)
        removed = api.request("PUT", "vm.remove-device", {"id": "pm0"}, check=False)
        assert removed.status == 204, removed
        console.step("removed", deadline)
        assert "pm0" not in api.counters()
        result = boot.wait()
        assert result.returncode == 0, result.describe()
        print(f"vmmkit pmem: boot to exit {result.elapsed:.0f} s, counters {counters}")
    finally:
        boot.kill()
    assert read_from_image(image, "guest.txt") == GUEST_TEXT + "\n"  # the file is the user's, kept


def test_the_same_guest_under_qemus_virtio_pmem(workdir: Path) -> None:
    """The reference: QEMU's ``virtio-pmem-pci`` (TCG) over the same kind of image."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    _skip_unless_ready()
    image = workdir / "pmem.img"
    make_image(image)
    boot = Boot("pmem-qemu", [
        QEMU, "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "128M,slots=2,maxmem=1G", "-nodefaults",
        "-no-user-config", "-nographic", "-serial", "stdio",
        "-object", f"memory-backend-file,id=pmem0,share=on,mem-path={image},size={IMAGE_SIZE}",
        "-device", "virtio-pmem-pci,memdev=pmem0,id=nv0",
        "-kernel", str(LINUX_DIR / "bzImage"), "-initrd", str(build_initramfs(workdir)), "-append", BASE_CMDLINE,
    ], timeout=TIMEOUT)
    try:
        console = Console(boot)
        deadline = time.monotonic() + TIMEOUT
        assert console.step("found", deadline) == str(IMAGE_SIZE // 512)
        assert "dax" in console.step("mounted", deadline)
        assert console.step("host-file", deadline) == HOST_TEXT
        console.step("synced", deadline)
        assert read_from_image(image, "guest.txt") == GUEST_TEXT + "\n"
        console.step("unmounted", deadline)
        result = boot.wait()
        assert result.returncode == 0, result.describe()
    finally:
        boot.kill()
