"""``vm.resize`` with ``desired_ram`` through the real API server and ``vmmkit-remote resize``
(no VM booted: /dev/kvm is not needed): before boot it sets ``memory.size``, as Cloud
Hypervisor's ``vm_resize`` does; bad values answer 400 and change nothing; ``desired_vcpus``
needs a running VM; without a VM, 404. The running VM's side is
tests/unit/test_memory_hotplug.py and tests/linux/test_linux_memory_hotplug.py."""

from __future__ import annotations

from typing import Any

import pytest

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.api.server import ApiServer
from vmmkit.config import VmConfig
from vmmkit.remote import main

MiB = 1 << 20
CONFIG = {"payload": {"kernel": "/nonexistent/vmlinux"}, "memory": {"size": 128 * MiB, "hotplug_size": 512 * MiB}}


def status_of(client: ApiClient, body: Any) -> tuple[int, str]:
    try:
        response = client.request("PUT", "vm.resize", body)
    except ApiError as error:
        return error.status, " ".join(error.messages)
    return response.status, ""


def test_before_boot_desired_ram_sets_the_memory_size(server: ApiServer, client: ApiClient) -> None:
    server.vmm.create(VmConfig.from_json(CONFIG))
    assert status_of(client, {"desired_ram": 256 * MiB}) == (204, "")
    assert client.info()["config"]["memory"]["size"] == 256 * MiB
    assert client.info()["memory_actual_size"] == 256 * MiB


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"desired_ram": "256M"}, 400, "positive integer"),
    ({"desired_ram": True}, 400, "positive integer"),
    ({"desired_ram": -1}, 400, "positive integer"),
    ({"desired_ram": 256 * MiB + 1}, 400, "not a multiple of the 4096-byte page"),
    ({}, 400, "needs one of desired_vcpus, desired_ram, desired_balloon"),
    ({"desired_ram": None}, 400, "needs one of"),
    ({"desired_memory": 256 * MiB}, 400, "VmResizeData has no desired_memory"),
    ({"desired_vcpus": 2}, 405, "not booted"),  # vCPUs are resized on a running VM only
    ({"desired_ram": 256 * MiB, "desired_vcpus": 2}, 405, "not booted"),  # refused whole
])
def test_bad_requests_are_refused_and_change_nothing(server: ApiServer, client: ApiClient, body: Any,
                                                     status: int, message: str) -> None:
    server.vmm.create(VmConfig.from_json(CONFIG))
    got, text = status_of(client, body)
    assert got == status and message in text, (got, text)
    assert client.info()["config"]["memory"]["size"] == 128 * MiB


def test_without_a_vm_it_is_404(server: ApiServer, client: ApiClient) -> None:
    assert status_of(client, {"desired_ram": 256 * MiB})[0] == 404


def test_vmmkit_remote_resize_sends_the_sizes(server: ApiServer, capsys: Any) -> None:
    assert server.path is not None
    server.vmm.create(VmConfig.from_json(CONFIG))
    assert main(["--api-socket", server.path, "resize", "--memory", "384M"]) == 0
    assert server.vmm.info()["config"]["memory"]["size"] == 384 * MiB
    assert main(["--api-socket", server.path, "resize", "--cpus", "2"]) == 1  # vCPUs: a running VM only
    assert "405" in capsys.readouterr().err
    assert main(["--api-socket", server.path, "resize", "--memory", "lots"]) == 2
    assert main(["--api-socket", server.path, "resize"]) == 2
    assert "--cpus, --memory, --balloon" in capsys.readouterr().err
