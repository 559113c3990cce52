"""Memory zones judged by Linux (an extra variant: ``VMMKIT_LINUX_ALL=1``; it costs one more
boot, about 2 minutes here, and the default run keeps one proof per feature): one boot of the
team's kernel (PVH) with ``--memory size=0,hotplug_method=virtio-mem``, a 96 MiB zone and a
32 MiB zone backed by a shared file with a ``hotplug_size`` of its own;
``memory_hotplug_init.sh`` is ``/init``. ``vm.resize-zone`` grows the second zone by 128 MiB:
Linux's ``virtio_mem`` driver, bound to that zone's device, plugs it and ``MemTotal`` grows by
exactly that; a second ``vm.resize-zone`` to 64 MiB above the zone's size makes the driver
unplug 64 MiB and ``MemTotal`` drops by that. The device's counters agree."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from initramfs import build_initramfs, missing_busybox_reason
from linuxboot import BASE_CMDLINE, LINUX_DIR, Boot, extra_variant, linux_missing_reason, scaled_timeout

from vmmkit.api.client import ApiClient
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm, extra_variant]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-MEMHP: "
MiB = 1 << 20
ZONE = 32 * MiB
TIMEOUT = scaled_timeout(900.0)


def step(boot: Boot, name: str, seen: int, deadline: float) -> tuple[int, list[str]]:
    """The words of the guest's next ``VMMKIT-MEMHP:`` line after ``seen`` lines (it must be
    ``name``), and how many lines that makes seen."""
    while time.monotonic() < deadline:
        for position in range(seen, len(boot.result.lines)):
            line = boot.result.lines[position][1]
            if PREFIX in line:
                words = line.split(PREFIX, 1)[1].split()
                assert words[0] == name, f"expected {name!r}: {line!r}\n{boot.result.describe()}"
                return position + 1, words[1:]
        if boot._proc.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"no {name!r} from the guest\n{boot.wait().describe()}")


def test_linux_follows_resize_zone(tmp_path: Path) -> None:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), kvm_unusable_reason()):
        if reason:
            pytest.skip(reason)
    initramfs = build_initramfs(tmp_path / "memhp.cpio", init=HERE / "memory_hotplug_init.sh")
    socket_path = tmp_path / "api.sock"
    command = [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(initramfs), "--cpus", "boot=1", "--serial", "tty",
        "--memory", "size=0,hotplug_method=virtio-mem", "--memory-zone", "id=boot,size=96M",
        "--memory-zone", f"id=elastic,size=32M,file={tmp_path / 'elastic.ram'},shared=on,hotplug_size=256M",
        "--cmdline", f"{BASE_CMDLINE} memhp_default_state=online_movable -- plugs=1 unplugs=1",
        "--api-socket", f"path={socket_path}",
    ]
    boot = Boot("memory-zones", command, timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    try:
        seen, (ready,) = step(boot, "ready", 0, deadline)
        api = ApiClient(str(socket_path), timeout=120)
        assert api.request("PUT", "vm.resize-zone", {"id": "elastic", "desired_ram": ZONE + 128 * MiB}).status == 204
        seen, grown = step(boot, "grown", seen, deadline)
        assert int(grown[0]) - int(ready) == 128 * 1024, (ready, grown)
        device = api.request("GET", "vm.counters").json()["_virtio-mem-elastic"]
        assert device["plugged_size"] == device["requested_size"] == 128 * MiB, device
        assert api.request("PUT", "vm.resize-zone", {"id": "elastic", "desired_ram": ZONE + 64 * MiB}).status == 204
        seen, shrunk = step(boot, "shrunk", seen, deadline)
        assert int(grown[0]) - int(shrunk[0]) == 64 * 1024, (grown, shrunk)
        device = api.request("GET", "vm.counters").json()["_virtio-mem-elastic"]
        assert device["plugged_size"] == device["requested_size"] == 64 * MiB, device
        result = boot.wait()
    finally:
        boot.kill()
    assert result.returncode == 0, result.describe()
    assert (tmp_path / "elastic.ram").stat().st_size == ZONE  # the zone's file: its boot RAM
