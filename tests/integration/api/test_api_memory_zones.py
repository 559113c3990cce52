"""``vm.resize-zone`` over the API and ``vmmkit-remote resize-zone`` against a real VMM whose
guest RAM is memory zones (``vm.create`` with ``memory.zones``): the zone's virtio-mem device gets
the new ``requested_size`` (``vm.counters``), ``vm.info`` shows the zone's ``hotplugged_size``,
the event monitor reports ``vm``/``resizing`` and ``resized``, and what cannot be done answers
4xx and changes nothing (an unknown zone, one without ``hotplug_size``, sizes out of range,
``vm.resize desired_ram`` on a VM with zones); a snapshot restored in a new VMM keeps the
zone's requested size. The test guest has no virtio-mem driver: the device's side is what is
checked here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_support import check_response, served_document

from vmmkit.api.client import ApiClient

from .conftest import VmmProcess

pytestmark = pytest.mark.requires_kvm

MIB = 1 << 20


def test_resize_zone_drives_that_zones_virtio_mem_device(vmm: VmmProcess, selftest_elf: Path) -> None:
    config = vmm.guest_config(selftest_elf)
    config["memory"] = {"size": 0, "hotplug_method": "VirtioMem", "zones": [
        {"id": "boot", "size": 64 * MIB},
        {"id": "elastic", "size": 32 * MIB, "hotplug_size": 128 * MIB, "shared": True},
    ]}
    vmm.create(config)
    client = ApiClient(str(vmm.socket))
    document = served_document()
    early = client.request("PUT", "vm.resize-zone", {"id": "elastic", "desired_ram": 64 * MIB}, check=False)
    assert early.status == 405 and "not booted" in early.json()[0], early
    vmm.remote("boot")
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["_virtio-mem-elastic"]["requested_size"] == 0

    answer = client.request("PUT", "vm.resize-zone", {"id": "elastic", "desired_ram": 32 * MIB + 96 * MIB})
    check_response(document, "vm.resize-zone", "PUT", answer.status, answer.body)
    assert answer.status == 204
    assert json.loads(vmm.remote("counters").stdout)["_virtio-mem-elastic"]["requested_size"] == 96 * MIB
    zones = vmm.info()["config"]["memory"]["zones"]
    assert zones[1]["id"] == "elastic" and zones[1]["hotplugged_size"] == 96 * MIB and "hotplugged_size" not in zones[0]
    assert vmm.info()["memory_actual_size"] == 96 * MIB + 96 * MIB
    vmm.remote("resize-zone", "--id", "elastic", "--size", "64M")
    assert json.loads(vmm.remote("counters").stdout)["_virtio-mem-elastic"]["requested_size"] == 32 * MIB
    assert vmm.events().count(("vm", "resized")) == 2

    refused = [
        ({"id": "nope", "desired_ram": 64 * MIB}, 400, "a memory zone of this VM (boot, elastic)"),
        ({"id": "boot", "desired_ram": 128 * MIB}, 400, "a zone with a hotplug_size"),
        ({"id": "elastic", "desired_ram": 512 * MIB}, 400, "32 MiB to 160 MiB"),
        ({"id": "elastic", "desired_ram": 16 * MIB}, 400, "32 MiB to 160 MiB"),
        ({"id": "elastic", "desired_ram": 33 * MIB}, 400, "2 MiB"),
        ({"id": "elastic", "desired_ram": 4097}, 400, "multiple of the 4096-byte page"),
        ({"id": "elastic", "desired_ram": "1G"}, 400, "desired_ram"),
        ({"id": "elastic"}, 400, "desired_ram"),
        ({"desired_ram": 64 * MIB}, 400, "id"),
        ({"id": "elastic", "desired_ram": 64 * MIB, "size": 1}, 400, "VmResizeZone has no size"),
    ]
    for body, status, message in refused:
        answer = client.request("PUT", "vm.resize-zone", body, check=False)
        assert answer.status == status and message in answer.json()[0], (body, answer)
        check_response(document, "vm.resize-zone", "PUT", answer.status, answer.body)
    ram = client.request("PUT", "vm.resize", {"desired_ram": 256 * MIB}, check=False)
    assert ram.status == 400 and "vm.resize-zone" in ram.json()[0], ram
    assert json.loads(vmm.remote("counters").stdout)["_virtio-mem-elastic"]["requested_size"] == 32 * MIB
    assert vmm.events().count(("vm", "resized")) == 2 and vmm.info()["state"] == "Running"
    bad = vmm.remote("resize-zone", "--id", "elastic", "--size", "12Q", check=False)
    assert bad.returncode == 2 and "--size" in bad.stderr

    # a snapshot keeps the zone's virtio-mem state; a new VMM restores it (the zones' RAM and
    # heartbeats are checked in test_snapshot_memory_zones.py)
    vmm.remote("pause")
    snapshot = client.request("PUT", "vm.snapshot", {"destination_url": f"file://{vmm.dir}/snap"})
    assert snapshot.status == 204, snapshot
    vmm.remote("shutdown-vmm")
    assert vmm.wait_exit() == 0
    (vmm.dir / "b").mkdir()
    second = VmmProcess(vmm.dir / "b", vmm.hypervisor, "--restore", f"source_url=file://{vmm.dir}/snap")
    try:
        assert second.info()["state"] == "Paused"
        assert second.info()["config"]["memory"]["zones"][1]["hotplugged_size"] == 32 * MIB
        assert json.loads(second.remote("counters").stdout)["_virtio-mem-elastic"]["requested_size"] == 32 * MIB
        second.remote("resume")
        second.remote("resize-zone", "--id", "elastic", "--size", "96M")
        assert json.loads(second.remote("counters").stdout)["_virtio-mem-elastic"]["requested_size"] == 64 * MIB
    finally:
        second.stop()
