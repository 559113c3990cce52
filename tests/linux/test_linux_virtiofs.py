"""``mount -t virtiofs`` under vmmkit: Linux (kvm) with vmmkit's vhost-user-fs frontend
(``--fs tag=,socket=``, needs ``--memory shared=on``) mounts a host directory served by
``vmmkit-vhost-user fs`` and runs ``virtiofs_init.sh``; the files it writes appear on the host,
and the symlink escapes stay inside the guest. The same guest and checks as
``tests/integration/test_vhost_user_fs_qemu.py``, where QEMU is the frontend.

~90 s alone on a kvm_pvm host; 315 s was seen at a load average of 11.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from initramfs import missing_busybox_reason
from linuxboot import BASE_CMDLINE, LINUX_DIR, Boot, linux_missing_reason, scaled_timeout
from virtiofs_share import (
    TAG,
    Daemon,
    build_initramfs,
    check_guest_and_share,
    check_requests,
    daemon_missing_reason,
    fs_lines,
    populate,
    requests_served,
)

from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow]

TIMEOUT = scaled_timeout(600.0)
OUTSIDE_NAMES = {"vfs.sock", "daemon.log", "fs-init.cpio"}


def vmmkit_lacks_fs() -> str | None:
    """Why this vmmkit cannot be the frontend (no installed device type claims ``--fs``), or
    ``None``."""
    from vmmkit.device import claimed_sections
    from vmmkit.plugin import collect_registries, make_plugin_manager

    if "fs" not in claimed_sections(collect_registries(make_plugin_manager()).devices):
        return "no installed device type claims --fs (vmmkit's vhost-user-fs frontend)"
    return None


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/tmp") / f"vmmkit-vfs-{os.getpid()}-{tmp_path.name[-20:]}"  # sockaddr_un's 108 bytes
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.requires_kvm
def test_linux_mounts_a_share_served_by_vmmkit_vhost_user_fs(workdir: Path) -> None:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), daemon_missing_reason(),
                   kvm_unusable_reason(), vmmkit_lacks_fs()):
        if reason:
            pytest.skip(reason)
    share = workdir / "share"
    share.mkdir()
    initramfs = build_initramfs(workdir / "fs-init.cpio")
    made = populate(share, workdir)
    daemon = Daemon(workdir, share)
    try:
        result = Boot("virtiofs", [
            sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
            "--initramfs", str(initramfs), "--cpus", "boot=1", "--memory", "size=256M,shared=on",
            "--serial", "tty", "--console", "off", "--fs", f"tag={TAG},socket={daemon.socket}",
            "--cmdline", BASE_CMDLINE,
        ], timeout=TIMEOUT).wait()
    finally:
        log = daemon.stop()
    assert result.returncode == 0 and not result.timed_out, result.describe()
    check_guest_and_share(fs_lines(result.output), share, workdir, made, OUTSIDE_NAMES)
    (account,) = requests_served(log)
    check_requests(account)
