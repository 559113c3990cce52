"""``vm.resize desired_balloon`` over the API and ``vmmkit-remote resize --balloon`` against a real
VMM: the balloon's target reaches the device (``vm.counters``) and the stored configuration, the
event monitor reports ``vm``/``resized``, and what cannot be done is answered 4xx (or 501 for the
resize fields vmmkit does not carry out) and changes nothing. The test guest has no balloon
driver: Linux inflating and deflating is tests/linux/test_linux_balloon.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from api_support import check_response, served_document

from vmmkit.api.client import ApiClient

from .conftest import VmmProcess

pytestmark = pytest.mark.requires_kvm

MIB = 1 << 20


def test_resize_balloon_before_and_after_boot(vmm: VmmProcess, selftest_elf: Path) -> None:
    vmm.create(vmm.guest_config(selftest_elf, balloon={"size": 4 * MIB, "deflate_on_oom": True}))
    client = ApiClient(str(vmm.socket))
    document = served_document()
    created = client.request("PUT", "vm.resize", {"desired_balloon": 8 * MIB})  # the config only, as CH
    check_response(document, "vm.resize", "PUT", created.status, created.body)
    assert created.status == 204 and vmm.info()["config"]["balloon"]["size"] == 8 * MIB
    vmm.remote("boot")
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["__balloon"]["target_pages"] == 8 * MIB // 4096
    vmm.remote("resize", "--balloon", "16M")
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["__balloon"]["target_pages"] == 16 * MIB // 4096
    assert counters["__balloon"]["actual_pages"] == 0  # the test guest has no balloon driver
    assert vmm.info()["config"]["balloon"] == {**vmm.info()["config"]["balloon"], "size": 16 * MIB,
                                               "deflate_on_oom": True}
    assert vmm.events().count(("vm", "resized")) == 2

    refused = [
        ({"desired_balloon": 64 * MIB}, 400, "less than the memory size"),
        ({"desired_balloon": -1}, 400, "desired_balloon"),
        ({"desired_balloon": True}, 400, "desired_balloon"),
        ({"desired_balloon": "1M"}, 400, "desired_balloon"),
        ({"desired_balloon": 1, "desired_vcpus": 99}, 400, "desired_vcpus"),  # refused whole
        ({"desired_ram": 128 * MIB}, 400, "desired_ram: this VM has no hotplug memory"),
        ({"balloon": 1}, 400, "VmResizeData has no balloon"),
        ({}, 400, "vm.resize needs one of"),
    ]
    for body, status, message in refused:
        answer = client.request("PUT", "vm.resize", body, check=False)
        assert answer.status == status and message in answer.json()[0], (body, answer)
        check_response(document, "vm.resize", "PUT", answer.status, answer.body)
    assert json.loads(vmm.remote("counters").stdout)["__balloon"]["target_pages"] == 16 * MIB // 4096
    assert vmm.info()["config"]["balloon"]["size"] == 16 * MIB and vmm.info()["state"] == "Running"
    bad = vmm.remote("resize", "--balloon", "12Q", check=False)
    assert bad.returncode == 2 and "--balloon" in bad.stderr
    nothing = vmm.remote("resize", check=False)
    assert nothing.returncode == 2 and "--balloon" in nothing.stderr


def test_resize_balloon_without_a_balloon_or_a_vm(start_vmm: Callable[..., VmmProcess], selftest_elf: Path) -> None:
    vmm = start_vmm()
    client = ApiClient(str(vmm.socket))
    none = client.request("PUT", "vm.resize", {"desired_balloon": MIB}, check=False)
    assert none.status == 404, none
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    answer = client.request("PUT", "vm.resize", {"desired_balloon": MIB}, check=False)
    assert answer.status == 400 and "no balloon" in answer.json()[0], answer
    remote = vmm.remote("resize", "--balloon", "1M", check=False)
    assert remote.returncode == 1 and "no balloon" in remote.stderr
    assert ("vm", "resized") not in vmm.events()
