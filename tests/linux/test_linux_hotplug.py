"""PCI hotplug judged by Linux: one boot of the team's kernel (PVH, virtio over PCI, two PCI
segments as Kata Containers asks for: ``num_pci_segments=2``) with the API socket and the event
monitor; ``hotplug_init.sh`` is ``/init``.

Linux finds segment 1's root bridge at boot (its MCFG entry and ``PC01`` in the DSDT). The host
hot-adds a disk on segment 1 with ``vm.add-disk`` once the guest says it is ready; Linux's
``acpiphp`` gets the GED's notification, runs ``PCNT`` and scans the slot, and ``/dev/vdb``
appears; the guest writes a pattern to it, which the host then reads in the image file. The host
removes the disk with ``vm.remove-device`` (which returns once the guest's ``_EJ0`` ejected it)
and the guest sees the function leave ``/sys/bus/pci/devices``. The monitor reports
``vm``/``device-removed`` with the id and address, as Cloud Hypervisor's does. In between,
``vm.resize-disk`` grows the boot disk's image and the guest sees ``/sys/block/vda/size`` follow
(virtio-blk's configuration-change interrupt). Last, where the test may make network namespaces
(root), the VMM runs in one and ``vm.add-net`` hot-adds a NIC on a tap it makes, in the slot the
disk left: the guest's ``eth0`` appears and pings the tap's host end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from initramfs import build_initramfs, missing_busybox_reason
from linuxboot import (
    BASE_CMDLINE,
    GUEST_ADDRESS,
    GUEST_MAC,
    HOST_ADDRESS,
    HOST_MASK,
    LINUX_DIR,
    PATTERN_OFFSET,
    PATTERN_SIZE,
    Boot,
    NetNamespace,
    block_pattern,
    linux_missing_reason,
    netns_missing_reason,
)

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.events import read_events
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-HOTPLUG: "
PATTERN = "vmmkit-hotplug-pattern"
HOTPLUG_DISK_SIZE = 8 << 20
BOOT_DISK_SIZE = 1 << 20
#: The whole scenario, boot included (the boot alone is ~40-90 s on a kvm_pvm host).
TIMEOUT = 480.0


class Guest:
    """The VMM process and its console, read step by step."""

    def __init__(self, boot: Boot, *, net: bool) -> None:
        self.boot = boot
        self.net = net  #: the VMM runs in a network namespace where it may make taps
        self.seen = 0

    def step(self, name: str, deadline: float) -> list[str]:
        """The words after ``name`` on the guest's next ``VMMKIT-HOTPLUG:`` line (which must be
        ``name``, not a timeout the guest reports)."""
        while time.monotonic() < deadline:
            lines = [line.split(PREFIX, 1)[1] for _, line in self.boot.result.lines[self.seen:] if PREFIX in line]
            for index, line in enumerate(lines):
                words = line.split()
                self.seen = self._index_of_nth(index + 1)
                assert words and words[0] == name, f"expected {name!r}, the guest said {line!r}\n" \
                                                   f"{self.boot.result.describe()}"
                return words[1:]
            if self.boot._proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {name!r} from the guest\n{self.boot.wait().describe()}")

    def _index_of_nth(self, count: int) -> int:
        seen = 0
        for position in range(self.seen, len(self.boot.result.lines)):
            if PREFIX in self.boot.result.lines[position][1]:
                seen += 1
                if seen == count:
                    return position + 1
        return len(self.boot.result.lines)


@pytest.fixture
def guest(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Guest, ApiClient, Path, Path]]:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), kvm_unusable_reason()):
        if reason:
            pytest.skip(reason)
    initramfs = build_initramfs(tmp_path / "hotplug.cpio", init=HERE / "hotplug_init.sh")
    boot_disk = tmp_path / "boot.img"
    with open(boot_disk, "wb") as image:
        image.truncate(BOOT_DISK_SIZE)
    socket_path = tmp_path / "api.sock"
    events = tmp_path / "events.json"
    namespace = NetNamespace(f"vmmkit-hotplug-{os.getpid()}") if netns_missing_reason() is None else None
    request.addfinalizer(lambda: namespace.close() if namespace is not None else None)
    net = f"net={GUEST_ADDRESS},{HOST_ADDRESS}" if namespace is not None else ""
    command = [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(initramfs), "--cpus", "boot=1", "--memory", "size=128M", "--serial", "tty",
        "--disk", f"path={boot_disk}", "--platform", "virtio_transport=pci,num_pci_segments=2",
        "--cmdline", f"{BASE_CMDLINE} -- pattern={PATTERN} {net}".rstrip(),
        "--api-socket", f"path={socket_path}", "--event-monitor", f"path={events}",
    ]
    if namespace is not None:
        command = namespace.wrap(command)
    boot = Boot("hotplug", command, timeout=TIMEOUT, cleanup=[namespace] if namespace else [])
    try:
        yield Guest(boot, net=namespace is not None), ApiClient(str(socket_path), timeout=90), events, boot_disk
    finally:
        boot.kill()


def test_a_disk_is_hot_added_written_and_hot_removed_and_one_resized(
        guest: tuple[Guest, ApiClient, Path, Path], tmp_path: Path) -> None:
    vm, api, events, boot_disk = guest
    deadline = time.monotonic() + TIMEOUT
    before = vm.step("ready", deadline)
    assert before[0].startswith("pci:") and "0001:00:00.0" in before, before  # segment 1's host bridge

    disk = tmp_path / "hotplug.img"
    with open(disk, "wb") as image:
        image.truncate(HOTPLUG_DISK_SIZE)
    added = api.request("PUT", "vm.add-disk", {"path": str(disk), "id": "hotdisk", "pci_segment": 1})
    assert added.status == 200, added
    info = added.json()
    assert info["id"] == "hotdisk" and info["bdf"].startswith("0001:00:"), info
    config = api.info()["config"]
    assert [d["id"] for d in config["disks"]] == ["_disk0", "hotdisk"], config["disks"]
    with pytest.raises(ApiError) as duplicate:
        api.request("PUT", "vm.add-disk", {"path": str(disk), "id": "hotdisk"})
    assert duplicate.value.status == 409

    bdf, sectors = vm.step("added", deadline)
    assert bdf == info["bdf"], (bdf, info)
    assert int(sectors) == HOTPLUG_DISK_SIZE // 512
    vm.step("written", deadline)
    with open(disk, "rb") as image:
        image.seek(PATTERN_OFFSET)
        assert image.read(PATTERN_SIZE) == block_pattern(PATTERN)

    resized = api.request("PUT", "vm.resize-disk", {"id": "_disk0", "desired_size": BOOT_DISK_SIZE * 4})
    assert resized.status == 204, resized
    assert os.path.getsize(boot_disk) == BOOT_DISK_SIZE * 4
    assert vm.step("resized", deadline) == [str(BOOT_DISK_SIZE * 4 // 512)]

    removed = api.request("PUT", "vm.remove-device", {"id": "hotdisk"})
    assert removed.status == 204, removed
    assert [d["id"] for d in api.info()["config"]["disks"]] == ["_disk0"]
    assert vm.step("gone", deadline) == [bdf]
    with pytest.raises(ApiError) as unknown:
        api.request("PUT", "vm.remove-device", {"id": "hotdisk"})
    assert unknown.value.status == 404

    if vm.net:  # a NIC on a tap the VMM makes, in the slot the disk left
        nic = api.request("PUT", "vm.add-net", {"tap": "vmhot0", "ip": HOST_ADDRESS, "mask": HOST_MASK,
                                                "mac": GUEST_MAC, "id": "hotnet", "pci_segment": 1})
        assert nic.status == 200 and nic.json() == {"id": "hotnet", "bdf": bdf}, nic
        assert vm.step("pinged", deadline) == [GUEST_ADDRESS]

    result = vm.boot.wait()
    (tmp_path / "console.log").write_text(result.output)
    for at, line in result.lines:
        if PREFIX in line:
            print(f"{at:7.1f} s  {line}")
    assert result.returncode == 0, result.describe()
    assert "ACPI Error" not in result.output and "ACPI Warning" not in result.output, result.output
    removals = [e for e in read_events(events.read_text()) if e.get("event") == "device-removed"]
    assert removals and removals[0]["source"] == "vm", removals
    assert removals[0]["properties"] == {"id": "hotdisk", "bdf": bdf}, removals
    assert os.path.getsize(disk) == HOTPLUG_DISK_SIZE
    json.dumps(removals)  # the monitor's events are plain JSON
