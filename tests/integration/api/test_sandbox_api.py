"""The sandbox of a real ``vmmkit --api-socket`` process (issue 18): every thread of a running
VM is under a seccomp filter by default and none with ``--seccomp false``; a Landlocked VMM
cannot be made to open a file outside its configuration through the API (``vm.add-disk
path=/etc/shadow``), while a disk under a ``landlock_rules`` path can still be hot-added."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmmkit.api.client import ApiClient

from .conftest import VmmProcess, fd_target, wait_for

GUEST_ARCH = "x86_64"
pytestmark = pytest.mark.requires_kvm


def thread_status(pid: int, field: str) -> dict[str, str]:
    """``{thread name (comm): value of field}`` for every thread of ``pid``."""
    out: dict[str, str] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        values = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[f"{values['Name'].strip()}/{tid}"] = values[field].strip()
    return out


def running_vm(vmm: VmmProcess, selftest_elf: Path, **extra: object) -> None:
    vmm.create(vmm.guest_config(selftest_elf, **extra))
    vmm.remote("boot")
    wait_for(lambda: vmm.heartbeats() >= 1, 60, "the guest's first heartbeat")


def test_every_thread_of_a_running_vm_is_under_a_filter(vmm: VmmProcess, selftest_elf: Path) -> None:
    running_vm(vmm, selftest_elf)
    seccomp = thread_status(vmm.proc.pid, "Seccomp")
    names = {name.split("/")[0] for name in seccomp}
    assert {"vcpu0", "vcpu1", "api-server", "vmm-events", "vmm-control"} <= names, seccomp
    assert set(seccomp.values()) == {"2"}, seccomp
    assert set(thread_status(vmm.proc.pid, "NoNewPrivs").values()) == {"1"}
    assert vmm.info()["state"] == "Running"


def test_seccomp_false_installs_no_filter(start_vmm: object, selftest_elf: Path) -> None:
    vmm = start_vmm("--seccomp", "false")  # type: ignore[operator]
    running_vm(vmm, selftest_elf)
    assert set(thread_status(vmm.proc.pid, "Seccomp").values()) == {"0"}


def test_a_landlocked_vmm_cannot_open_etc_shadow_through_the_api(vmm: VmmProcess, selftest_elf: Path,
                                                                 short_dir: Path) -> None:
    images = short_dir / "images"
    images.mkdir()
    boot_disk = short_dir / "boot.img"
    for path in (boot_disk, images / "hot.img"):
        with open(path, "wb") as image:
            image.truncate(1 << 20)
    running_vm(vmm, selftest_elf, disks=[{"path": str(boot_disk)}], landlock_enable=True,
               landlock_rules=[{"path": str(images), "access": "rw"}])
    assert "Landlock" not in vmm.log.read_text()
    client = ApiClient(str(vmm.socket))
    answer = client.request("PUT", "vm.add-disk", {"path": "/etc/shadow", "readonly": True}, check=False)
    assert answer.status == 400, answer
    assert "Permission denied" in answer.json()[0] or "EACCES" in answer.json()[0], answer.json()
    opened = [fd_target(vmm.proc.pid, int(fd)) for fd in os.listdir(f"/proc/{vmm.proc.pid}/fd")]
    assert "/etc/shadow" not in opened
    # a disk beneath a rule's path is hot-added as usual
    added = json.loads(vmm.remote("add-disk", f"path={images / 'hot.img'},id=hot0").stdout)
    assert added["id"] == "hot0"
    # and the guest's data outside the configuration stays out of reach for every thread
    assert vmm.info()["state"] == "Running"
