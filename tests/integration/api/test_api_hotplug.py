"""Hotplug requests on a running VM over the API, with ``vmmkit-remote``: the answers (CH's
``PciDeviceInfo``, the 4xx of a VM that cannot take a request), the configuration kept in
step, the GED's notification counted, a tap fd passed by SCM_RIGHTS. The test guest cannot
run ACPI, so the guest's side (the device appearing, the eject) is tests/linux/test_linux_hotplug.py."""

from __future__ import annotations

import fcntl
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from api_support import check_response, served_document

from vmmkit.api.client import ApiClient

from .conftest import VmmProcess, fd_target

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm


def _disk(directory: Path, name: str) -> Path:
    path = directory / name
    with open(path, "wb") as image:
        image.truncate(1 << 20)
    return path


def test_hot_add_answers_pci_device_info_and_keeps_the_config(vmm: VmmProcess, selftest_elf: Path,
                                                              short_dir: Path) -> None:
    boot_disk = _disk(short_dir, "boot.img")
    vmm.create(vmm.guest_config(selftest_elf, disks=[{"path": str(boot_disk)}]))
    vmm.remote("boot")
    added = json.loads(vmm.remote("add-disk", f"path={_disk(short_dir, 'hot.img')},id=hot0").stdout)
    assert added["id"] == "hot0" and added["bdf"].startswith("0000:00:") and added["bdf"].endswith(".0")
    assert [d["id"] for d in vmm.info()["config"]["disks"]] == ["_disk0", "hot0"]
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["_acpi_ged"]["pci_notifications"] == 1 and "hot0" in counters

    client = ApiClient(str(vmm.socket))
    document = served_document()
    # a second disk without an id gets the next default one and the next slot
    body = {"path": str(_disk(short_dir, "hot1.img"))}
    response = client.request("PUT", "vm.add-disk", body)
    check_response(document, "vm.add-disk", "PUT", response.status, response.body, response.headers.get("content-type"))
    second = response.json()
    assert second["id"] == "_disk1" and second["bdf"] != added["bdf"]

    # what the VM cannot take: answered 4xx with the reason, nothing changes
    refused = [
        ("vm.add-disk", {"path": str(boot_disk), "id": "hot0"}, 409, "already exists"),
        ("vm.add-disk", {"path": str(short_dir / "missing.img")}, 400, "missing.img"),
        ("vm.remove-device", {"id": "nothing"}, 404, "no device with id 'nothing'"),
        ("vm.remove-device", {"id": "_serial"}, 400, "not a PCI device"),
        ("vm.remove-device", {"id": "_pci_hotplug"}, 400, "not a PCI device"),
    ]
    for endpoint, request, status, message in refused:
        answer = client.request("PUT", endpoint, request, check=False)
        assert answer.status == status and message in answer.json()[0], (endpoint, request, answer)
        check_response(document, endpoint, "PUT", answer.status, answer.body)
    assert [d["id"] for d in vmm.info()["config"]["disks"]] == ["_disk0", "hot0", "_disk1"]
    assert vmm.info()["state"] == "Running"


def test_hot_add_net_takes_a_tap_fd_by_scm_rights(vmm: VmmProcess, selftest_elf: Path) -> None:
    try:
        tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"/dev/net/tun: {exc.strerror}")
    try:
        ifr = struct.pack("16sH", b"vkhot%d", 0x0002 | 0x1000 | 0x4000)  # TAP, NO_PI, VNET_HDR
        try:
            fcntl.ioctl(tap, 0x400454CA, ifr)  # TUNSETIFF
        except OSError as exc:
            pytest.skip(f"cannot create a tap device: {exc.strerror}")
        vmm.create(vmm.guest_config(selftest_elf))
        vmm.remote("boot")
        os.set_inheritable(tap, True)
        added = json.loads(vmm.remote("add-net", f"fd=[{tap}],mac=12:34:56:78:9a:bc,id=hotnet",
                                      pass_fds=(tap,)).stdout)
        assert added["id"] == "hotnet" and added["bdf"].startswith("0000:00:")
        (net,) = vmm.info()["config"]["net"]
        (vmm_fd,) = net["fds"]
        assert net["id"] == "hotnet" and fd_target(vmm.proc.pid, vmm_fd) == "/dev/net/tun"
        assert "hotnet" in json.loads(vmm.remote("counters").stdout)
    finally:
        os.close(tap)


def test_a_virtio_mmio_vm_refuses_hotplug(vmm: VmmProcess, selftest_elf: Path, short_dir: Path) -> None:
    vmm.create(vmm.guest_config(selftest_elf, platform={"virtio_transport": "mmio"}))
    vmm.remote("boot")
    answer = ApiClient(str(vmm.socket)).request("PUT", "vm.add-disk", {"path": str(_disk(short_dir, "x.img"))},
                                                check=False)
    assert answer.status == 400 and "hotplug needs --platform virtio_transport=pci" in answer.json()[0], answer
    assert "disks" not in vmm.info()["config"] or not vmm.info()["config"]["disks"]


def test_resize_disk_grows_the_image_and_refuses_what_it_cannot(vmm: VmmProcess, selftest_elf: Path,
                                                                short_dir: Path) -> None:
    disk = _disk(short_dir, "grow.img")
    readonly = _disk(short_dir, "ro.img")
    vmm.create(vmm.guest_config(selftest_elf, disks=[{"path": str(disk), "id": "d0"},
                                                    {"path": str(readonly), "id": "ro", "readonly": True}]))
    client = ApiClient(str(vmm.socket))
    document = served_document()
    before = client.request("PUT", "vm.resize-disk", {"id": "d0", "desired_size": 2 << 20}, check=False)
    assert before.status == 405 and "not booted" in before.json()[0]
    vmm.remote("boot")
    vmm.remote("resize-disk", "--disk", "d0", "--size", "4M")
    assert disk.stat().st_size == 4 << 20
    assert json.loads(vmm.remote("info").stdout)["state"] == "Running"
    refused = [
        ({"id": "d0", "desired_size": 1000}, 400, "multiple of 512"),
        ({"id": "ro", "desired_size": 2 << 20}, 400, "read-only"),
        ({"id": "nothing", "desired_size": 2 << 20}, 404, "no disk with id 'nothing'"),
        ({"id": "_serial", "desired_size": 2 << 20}, 404, "no disk with id '_serial'"),
        ({"id": "d0"}, 400, "desired_size"),
        ({"id": "d0", "desired_size": 2 << 20, "size": 1}, 400, "size"),
    ]
    for body, status, message in refused:
        answer = client.request("PUT", "vm.resize-disk", body, check=False)
        assert answer.status == status and message in answer.json()[0], (body, answer)
        check_response(document, "vm.resize-disk", "PUT", answer.status, answer.body)
    assert disk.stat().st_size == 4 << 20 and readonly.stat().st_size == 1 << 20
    bad = vmm.remote("resize-disk", "--disk", "d0", "--size", "12Q", check=False)
    assert bad.returncode == 2 and "--size" in bad.stderr


def test_a_guest_that_does_not_eject_gets_a_bounded_wait(vmmkit_pm: Any, vmmkit_registries: Any, selftest_elf: Path,
                                                         short_dir: Path, vmmkit_hypervisor: str) -> None:
    """The test guest has no ACPI interpreter: the removal times out with a clear error, the
    device stays (only the guest's eject removes it), and a reset carries the removal out."""
    from vmmkit.config import DiskConfig, VmConfig
    from vmmkit.vmm import EjectTimeout, Vmm

    vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm, hypervisor=vmmkit_hypervisor)
    try:
        vmm.create(VmConfig.from_json({
            "payload": {"kernel": str(selftest_elf), "cmdline": "test=spin"},
            "memory": {"size": 64 << 20}, "serial": {"mode": "Null"}, "console": {"mode": "Off"},
        }))
        vmm.boot()
        added = vmm.add_disk(DiskConfig(path=str(_disk(short_dir, "stuck.img")), id="stuck"))
        assert added is not None and added["id"] == "stuck"
        with pytest.raises(EjectTimeout, match="did not eject device 'stuck' within 0 s"):
            vmm.remove_device("stuck", timeout=0.3)
        machine = vmm.machine
        assert machine is not None and "stuck" in machine.manager  # still on the bus
        machine.manager.reset()  # what a VM reset does: the guest will never eject it now
        assert "stuck" not in machine.manager

        # An eject nobody asked for (Linux: echo 0 > /sys/bus/pci/slots/N/power runs _EJ0): the
        # B0EJ write, made here from the host, takes the device and its config entry away.
        own = vmm.add_disk(DiskConfig(path=str(_disk(short_dir, "own.img")), id="own"))
        assert own is not None and "own" in [d.id for d in vmm.config.disks]  # type: ignore[union-attr]
        slot = int(own["bdf"].split(":")[2].split(".")[0], 16)
        hotplug = machine.manager.get("_pci_hotplug").mmio
        assert hotplug is not None
        machine.mmio_bus.write(hotplug[0] + 8, (1 << slot).to_bytes(4, "little"))
        assert "own" not in machine.manager
        assert "own" not in [d.id for d in vmm.config.disks]  # type: ignore[union-attr]
    finally:
        vmm.close()
