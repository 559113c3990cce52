"""``vmmkit-remote``: ch-remote's subcommands against a real server (no VM booted)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmmkit.api.server import ApiServer
from vmmkit.config import VmConfig
from vmmkit.remote import main


def remote(server: ApiServer, *args: str) -> int:
    assert server.path is not None
    return main(["--api-socket", server.path, *args])


CONFIG = {"payload": {"kernel": "/nonexistent/vmlinux"}, "memory": {"size": 64 << 20}}


def test_ping_prints_the_answer(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert remote(server, "ping") == 0
    assert json.loads(capsys.readouterr().out)["pid"] == os.getpid()


def test_create_from_a_file_and_from_stdin(server: ApiServer, tmp_path: Path, capsys: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(CONFIG))
    assert remote(server, "create", str(path)) == 0
    assert remote(server, "delete") == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(json.dumps(CONFIG).encode())))
    assert remote(server, "create") == 0
    assert remote(server, "info") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "Created"


def test_add_disk_net_device_and_remove(server: ApiServer, capsys: Any) -> None:
    server.vmm.create(VmConfig.from_json(CONFIG))
    assert remote(server, "add-disk", "path=/tmp/x.img,readonly=on,id=d1") == 0
    # VFIO (vfio-pci): before boot the device joins the configuration; a key it does not take is
    # refused by name (400), not stored and ignored (issue #12)
    assert remote(server, "add-device", "path=/sys/bus/pci/devices/0000:00:01.0/,iommu=on") == 1
    assert "devices[0].iommu: not supported yet" in capsys.readouterr().err
    assert remote(server, "add-device", "path=/sys/bus/pci/devices/0000:00:01.0/,id=pt0") == 0
    assert [d["id"] for d in server.vmm.info()["config"]["devices"]] == ["pt0"]
    assert remote(server, "remove-device", "pt0") == 0
    read_end, write_end = os.pipe()
    try:
        assert remote(server, "add-net", f"fd=[{read_end}],mac=12:34:56:78:9a:bc,id=n1") == 0
        info = server.vmm.info()["config"]
        assert info["disks"][0]["readonly"] is True
        (fd,) = info["net"][0]["fds"]
        os.write(write_end, b"tap")
        assert os.read(fd, 10) == b"tap"  # the VMM got our pipe, not our fd number
    finally:
        os.close(read_end)
        os.close(write_end)
    assert remote(server, "remove-device", "d1") == 0
    assert [d["id"] for d in server.vmm.info()["config"].get("disks", [])] == []


def test_a_refusal_prints_the_messages_and_exits_1(server: ApiServer, capsys: Any) -> None:
    assert remote(server, "boot") == 1
    err = capsys.readouterr().err
    assert "404" in err and "not created" in err


def test_a_bad_spec_is_a_usage_error(server: ApiServer, capsys: Any) -> None:
    assert remote(server, "add-disk", "pth=x") == 2
    assert "pth" in capsys.readouterr().err


def test_no_vmm_listening(tmp_path: Path, capsys: Any) -> None:
    assert main(["--api-socket", str(tmp_path / "none.sock"), "ping"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_unimplemented_things_are_not_subcommands() -> None:
    with pytest.raises(SystemExit) as info:
        main(["--api-socket", "x", "coredump", "file:///tmp/x"])
    assert info.value.code == 2
