"""``vm.resize desired_vcpus`` over the API and ``vmmkit-remote resize --cpus``: a vCPU added to a
running VM gets its thread (``vcpuN``) and the GED's CPU notification, the configuration
follows, requests the VM cannot take answer 4xx and change nothing, and a removal the guest
does not carry out answers 504 and stays pending (429 for the next resize). The test guest cannot
run ACPI, so the guest's side (Linux onlining and ejecting the vCPUs) is
tests/linux/test_linux_cpu_hotplug.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_support import check_response, served_document

from vmmkit.api.client import ApiClient
from vmmkit.events import read_events

from .conftest import VmmProcess

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm


def vcpu_threads(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("vcpu"):
            names.append(name)
    return sorted(names)


def test_vcpus_are_hot_added_and_a_removal_waits_for_the_guest(vmm: VmmProcess, selftest_elf: Path) -> None:
    client = ApiClient(str(vmm.socket), timeout=90)
    document = served_document()
    config = vmm.guest_config(selftest_elf)
    config["cpus"] = {"boot_vcpus": 1, "max_vcpus": 3}
    vmm.create(config)
    before = client.request("PUT", "vm.resize", {"desired_vcpus": 2}, check=False)
    assert before.status == 405 and "not booted" in before.json()[0], before
    vmm.remote("boot")
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0"]

    vmm.remote("resize", "--cpus", "3")
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0", "vcpu1", "vcpu2"]
    assert vmm.info()["config"]["cpus"]["boot_vcpus"] == 3
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["_acpi_ged"]["cpu_notifications"] == 1, counters
    assert {"vcpu0", "vcpu1", "vcpu2"} <= set(counters), counters
    assert vmm.info()["state"] == "Running"

    refused = [
        ({"desired_vcpus": 4}, 400, "max_vcpus (3"),
        ({"desired_vcpus": 0}, 400, "1 to max_vcpus"),
        ({"desired_vcpus": True}, 400, "positive integer"),
        ({"desired_vcpus": 4, "desired_ram": 1 << 30}, 400, "max_vcpus (3"),  # nothing done
        ({"desired_ram": 1 << 30}, 400, "desired_ram: this VM has no hotplug memory"),
        # a part the VM could take is not carried out when another part is refused
        ({"desired_vcpus": 2, "desired_ram": 1 << 30}, 400, "desired_ram: this VM has no hotplug memory"),
        ({"desired_vcpus": 2, "desired_balloon": 1 << 20}, 400, "desired_balloon: this VM has no balloon"),
        ({"desired_balloon": 1 << 20}, 400, "desired_balloon: this VM has no balloon"),
        ({"desired_cpus": 2}, 400, "VmResizeData has no desired_cpus"),
        ({}, 400, "vm.resize needs one of"),
    ]
    for body, status, message in refused:
        answer = client.request("PUT", "vm.resize", body, check=False)
        assert answer.status == status and message in answer.json()[0], (body, answer)
        check_response(document, "vm.resize", "PUT", answer.status, answer.body)
    assert vmm.remote("resize", check=False).returncode == 2
    assert vmm.remote("resize", "--cpus", "0", check=False).returncode == 2
    assert vmm.info()["config"]["cpus"]["boot_vcpus"] == 3
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0", "vcpu1", "vcpu2"]

    # the test guest runs no AML: it never ejects, so the removal times out and stays pending
    shrink = client.request("PUT", "vm.resize", {"desired_vcpus": 1}, check=False)
    assert shrink.status == 504 and "did not eject its vCPUs" in shrink.json()[0], shrink
    pending = client.request("PUT", "vm.resize", {"desired_vcpus": 3}, check=False)
    assert pending.status == 429 and "still pending" in pending.json()[0], pending
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0", "vcpu1", "vcpu2"]
    assert json.loads(vmm.remote("counters").stdout)["_acpi_ged"]["cpu_notifications"] == 2

    # a reboot carries the removal out: the guest starts again with one vCPU
    vmm.remote("reboot")
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0"]
    assert vmm.info()["config"]["cpus"]["boot_vcpus"] == 1
    vmm.remote("resize", "--cpus", "2")  # vCPU 1 comes back (reused: KVM never destroys one)
    assert vcpu_threads(vmm.proc.pid) == ["vcpu0", "vcpu1"]

    events = [(e["source"], e["event"]) for e in read_events(vmm.events_path.read_text()) if "resiz" in e["event"]]
    assert events == [("vm", "resizing"), ("vm", "resized"), ("vm", "resizing"), ("vm", "resizing"),
                      ("vm", "resized")], events
