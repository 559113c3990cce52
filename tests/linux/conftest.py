"""Fixtures for the real-Linux tests: the team's kernel, the project's initramfs, and the boots.

The boots are slow (a minute or more each on a host whose KVM emulates guest kernel code), so
each is done once per session and shared by every test that asserts on it, and all the boots
the selected tests need start together, in parallel, when the first of them is wanted:

- ``pvh``: vmmkit, ``vmlinux`` through its PVH entry, virtio devices over PCI;
- ``bzimage``: vmmkit, ``bzImage`` through the Linux boot protocol, virtio devices over MMIO;
- ``qemu``: QEMU with TCG, the ``bzImage``, the same devices over virtio-pci.

A test says which boots it reads with ``@pytest.mark.linux_boot("pvh", ...)``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from initramfs import build_initramfs, missing_busybox_reason  # noqa: E402
from linuxboot import (  # noqa: E402
    LINUX_DIR,
    QEMU,
    Boot,
    BootResult,
    GuestFiles,
    NetNamespace,
    linux_missing_reason,
    netns_missing_reason,
    qemu_command,
    scaled_timeout,
    vmmkit_command,
)

from vmmkit.testing import kvm_unusable_reason, selected_backend  # noqa: E402

#: Seconds each boot may take before it counts as hung (normal: ~80 s, ~150 s, ~5 s).
TIMEOUTS = {name: scaled_timeout(seconds) for name, seconds in {"pvh": 420.0, "bzimage": 600.0, "qemu": 180.0}.items()}
#: The word /init writes to each disk (checked in the image afterwards).
PATTERNS = {"pvh": "vmmkit-pvh-pattern", "bzimage": "vmmkit-bzimage-pattern", "qemu": "vmmkit-qemu-pattern"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "linux_boot(*names): the shared Linux boots a test reads (tests/linux)")


@pytest.fixture(scope="session")
def linux_dir() -> Path:
    reason = linux_missing_reason(LINUX_DIR)
    if reason:
        pytest.skip(reason)
    return LINUX_DIR


@pytest.fixture(scope="session")
def test_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's initramfs, built from Debian's busybox-static."""
    reason = missing_busybox_reason()
    if reason:
        pytest.skip(reason)
    return build_initramfs(tmp_path_factory.mktemp("initramfs") / "init.cpio")


class LinuxBoots:
    """The session's boots: started together on first use, each awaited when read."""

    def __init__(self, session: pytest.Session, kernel_dir: Path, initramfs: Path, workdir: Path) -> None:
        self.kernel_dir = kernel_dir
        self.initramfs = initramfs
        self.workdir = workdir
        self.wanted = _wanted_boots(session)
        self.patterns = PATTERNS
        self.files: dict[str, GuestFiles] = {}
        self.boots: dict[str, Boot] = {}
        self.skipped: dict[str, str] = {}
        self.net_reason = netns_missing_reason()
        self.started = False

    def _start_all(self) -> None:
        self.started = True
        for name in sorted(self.wanted):
            reason = self._unavailable(name)
            if reason:
                self.skipped[name] = reason
                continue
            try:
                self.boots[name] = self._start(name)
            except (OSError, RuntimeError) as exc:
                self.skipped[name] = f"could not start the {name} boot: {exc}"

    def _unavailable(self, name: str) -> str | None:
        if name == "qemu":
            return None if shutil.which(QEMU) else f"requires {QEMU} (apt-get install qemu-system-x86)"
        reason = kvm_unusable_reason()
        if reason:
            return f"requires KVM: {reason}"
        hypervisor, arch = selected_backend()
        if hypervisor not in ("auto", "kvm") or arch != "x86_64":
            return f"the Linux boots run on KVM x86-64, this session targets {hypervisor}/{arch}"
        return None

    def _start(self, name: str) -> Boot:
        files = self.files[name] = GuestFiles(self.workdir / name)
        namespace = None
        if self.net_reason is None:
            namespace = NetNamespace(f"vmmkit-{name}-{os.getpid()}")
        try:
            if name == "qemu":
                tap = None
                if namespace is not None:
                    tap = "qtap0"
                    namespace.add_tap(tap, "10.0.2.1/24")
                cmd = qemu_command(self.kernel_dir / "bzImage", self.initramfs, files, pattern=PATTERNS[name],
                                   tap=tap)
            else:
                kernel = "vmlinux" if name == "pvh" else "bzImage"
                transport = "pci" if name == "pvh" else "mmio"
                cmd = vmmkit_command(self.kernel_dir / kernel, self.initramfs, files, pattern=PATTERNS[name],
                                     net=namespace is not None, transport=transport, extra=["--hypervisor", "kvm"])
            if namespace is not None:
                cmd = namespace.wrap(cmd)
            return Boot(name, cmd, timeout=TIMEOUTS[name], cleanup=[namespace] if namespace else [])
        except BaseException:
            if namespace is not None:
                namespace.close()
            raise

    def get(self, name: str) -> tuple[BootResult, GuestFiles]:
        """The finished boot ``name`` (skips the test with the reason if it cannot run)."""
        if not self.started:
            self._start_all()
        if name in self.skipped:
            pytest.skip(self.skipped[name])
        if name not in self.boots:
            pytest.fail(f"boot {name!r} was not requested by any linux_boot marker")
        return self.boots[name].wait(), self.files[name]

    def close(self) -> None:
        for boot in self.boots.values():
            boot.kill()


def _wanted_boots(session: pytest.Session) -> set[str]:
    wanted: set[str] = set()
    for item in session.items:
        for marker in item.iter_markers("linux_boot"):
            wanted.update(marker.args)
    return wanted


@pytest.fixture(scope="session")
def linux_boots(
    request: pytest.FixtureRequest, linux_dir: Path, test_initramfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LinuxBoots]:
    boots = LinuxBoots(request.session, linux_dir, test_initramfs, tmp_path_factory.mktemp("linux-boots"))
    yield boots
    boots.close()
