"""``vm.add-pmem`` before boot, over the API and through ``vmmkit-remote add-pmem`` (hot-adding to
a booted VM: tests/integration/api/test_api_pmem.py; Linux using it: tests/linux/test_linux_pmem.py)."""

from __future__ import annotations

from api_support import ch_document, check_request

from vmmkit.api.client import ApiClient
from vmmkit.api.server import ApiServer
from vmmkit.remote import main

CONFIG = {"payload": {"kernel": "/nonexistent/vmlinux"}, "memory": {"size": 64 << 20}}


def test_cold_add_pmem(client: ApiClient) -> None:
    client.request("PUT", "vm.create", CONFIG)
    pmem = {"file": "/tmp/vmmkit-never-opened.img", "size": 2 << 20, "id": "pm0"}
    check_request(ch_document(), "vm.add-pmem", "PUT", pmem)
    assert client.request("PUT", "vm.add-pmem", pmem).status == 204  # the file is opened at boot
    config = client.request("GET", "vm.info").json()["config"]
    assert config["pmem"] == [{**config["pmem"][0], **pmem}]
    refused = [
        ({**pmem, "id": "pm1", "size": 3 << 20}, "a positive multiple of 2M"),
        ({**pmem, "id": "pm1", "iommu": True}, "pmem[1].iommu: not supported yet"),
        ({"size": 2 << 20}, "file"),
    ]
    for body, said in refused:
        answer = client.request("PUT", "vm.add-pmem", body, check=False)
        assert answer.status == 400 and said in answer.json()[0], (body, answer)
    assert client.request("PUT", "vm.add-pmem", pmem, check=False).status == 409  # the same id again
    assert client.request("PUT", "vm.remove-device", {"id": "pm0"}).status == 204
    assert "pmem" not in client.request("GET", "vm.info").json()["config"]


def test_remote_add_pmem(server: ApiServer) -> None:
    assert server.path is not None
    client = ApiClient(server.path)
    client.request("PUT", "vm.create", CONFIG)
    assert main(["--api-socket", server.path, "add-pmem", "file=/tmp/p.img,size=4M,discard_writes=on"]) == 0
    (pmem,) = client.request("GET", "vm.info").json()["config"]["pmem"]
    assert pmem["size"] == 4 << 20 and pmem["discard_writes"] is True
    assert main(["--api-socket", server.path, "add-pmem", "size=4M"]) == 2  # no file=
