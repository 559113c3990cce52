"""``vm.add-vsock`` before boot, over the API and through ``vmmkit-remote add-vsock`` (hot-adding
to a booted VM is judged by Linux in tests/linux/test_linux_vsock.py)."""

from __future__ import annotations

from api_support import ch_document, check_request

from vmmkit.api.client import ApiClient
from vmmkit.api.server import ApiServer
from vmmkit.remote import main

CONFIG = {"payload": {"kernel": "/nonexistent/vmlinux"}, "memory": {"size": 64 << 20}}


def test_cold_add_vsock_once(client: ApiClient) -> None:
    client.request("PUT", "vm.create", CONFIG)
    vsock = {"cid": 3, "socket": "/tmp/vmmkit-never-bound.vsock", "id": "vs"}
    check_request(ch_document(), "vm.add-vsock", "PUT", vsock)
    assert client.request("PUT", "vm.add-vsock", vsock).status == 204
    config = client.request("GET", "vm.info").json()["config"]
    assert config["vsock"]["cid"] == 3 and config["vsock"]["id"] == "vs"
    again = client.request("PUT", "vm.add-vsock", {**vsock, "id": "other"}, check=False)
    assert again.status == 400 and "vsock already present" in again.json()[0]
    bad = client.request("PUT", "vm.add-vsock", {"cid": 2, "socket": "/tmp/x"}, check=False)
    assert bad.status == 400
    assert client.request("PUT", "vm.remove-device", {"id": "vs"}).status == 204
    assert "vsock" not in client.request("GET", "vm.info").json()["config"]


def test_remote_add_vsock(server: ApiServer) -> None:
    assert server.path is not None
    client = ApiClient(server.path)
    client.request("PUT", "vm.create", CONFIG)
    assert main(["--api-socket", server.path, "add-vsock", "cid=4,socket=/tmp/v.sock"]) == 0
    assert client.request("GET", "vm.info").json()["config"]["vsock"]["cid"] == 4
    assert main(["--api-socket", server.path, "add-vsock", "cid=1,socket=/tmp/v.sock"]) == 2
