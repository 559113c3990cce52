"""``vm.add-pmem`` on a running VM (the test guest spins; it cannot run ACPI, so Linux seeing the
device come and go is tests/linux/test_linux_pmem.py): CH's ``PciDeviceInfo`` answer, the
file mapped (the device's counters appear), a bad file answered 400 by name and nothing
changed, the configuration kept in step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from api_support import check_response, served_document

from vmmkit.api.client import ApiClient

from .conftest import VmmProcess

GUEST_ARCH = "x86_64"

pytestmark = pytest.mark.requires_kvm


def test_hot_add_pmem(vmm: VmmProcess, selftest_elf: Path, short_dir: Path) -> None:
    image = short_dir / "pmem.img"
    with image.open("wb") as out:
        out.truncate(2 << 20)
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    added = json.loads(vmm.remote("add-pmem", f"file={image},size=4M,id=pm0").stdout)
    assert added["id"] == "pm0" and added["bdf"].startswith("0000:00:")
    assert image.stat().st_size == 4 << 20  # extended to size=
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["pm0"]["flushes"] == 0 and counters["_acpi_ged"]["pci_notifications"] == 1

    client = ApiClient(str(vmm.socket))
    document = served_document()
    for body, said in [({"file": str(short_dir)}, "is a directory: give size="),
                       ({"file": str(short_dir / "none.img")}, "cannot be opened")]:
        answer = client.request("PUT", "vm.add-pmem", body, check=False)
        check_response(document, "vm.add-pmem", "PUT", answer.status, answer.body)
        assert answer.status == 400 and said in answer.json()[0], (body, answer)
    second = client.request("PUT", "vm.add-pmem", {"file": str(short_dir), "size": 2 << 20})
    check_response(document, "vm.add-pmem", "PUT", second.status, second.body, second.headers.get("content-type"))
    assert second.json()["id"] != "pm0" and second.json()["bdf"] != added["bdf"]
    assert [p["id"] for p in vmm.info()["config"]["pmem"]] == ["pm0", second.json()["id"]]
    assert vmm.info()["state"] == "Running"


def test_snapshot_and_restore_keep_the_region(start_vmm, selftest_elf: Path, short_dir: Path,  # noqa: ANN001
                                              vmmkit_hypervisor: str) -> None:
    """The device's state is where its region is; the snapshot holds no copy of the file (its
    memory files are the RAM's), and the restored VM maps the file at the same place."""
    image = short_dir / "pmem.img"
    with image.open("wb") as out:
        out.truncate(4 << 20)
    first = start_vmm()
    first.create(first.guest_config(selftest_elf, pmem=[{"file": str(image), "id": "pm0"}]))
    first.remote("boot")
    first.remote("pause")
    first.remote("snapshot", f"file://{short_dir}/snap")
    first.remote("shutdown-vmm")
    assert first.wait_exit() == 0
    state = json.loads((short_dir / "snap" / "state.json").read_text())
    (saved,) = [entry for entry in state["devices"] if entry["id"] == "pm0"]
    device_state = saved["state"]["virtio"]["device"]["state"]
    assert device_state["size"] == 4 << 20 and device_state["start"] % (2 << 20) == 0, device_state
    ram = sum(entry["size"] for entry in state["memory"])
    assert sum(path.stat().st_size for path in (short_dir / "snap").glob("memory-*.bin")) == ram

    (short_dir / "b").mkdir()
    second = VmmProcess(short_dir / "b", vmmkit_hypervisor, "--restore", f"source_url=file://{short_dir}/snap")
    try:
        deadline = time.monotonic() + 60  # the API answers while --restore is still building the VM
        while True:
            try:
                info = second.info()
                break
            except AssertionError:  # 404: not restored yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert info["state"] == "Paused"
        assert [p["id"] for p in second.info()["config"]["pmem"]] == ["pm0"]
        second.remote("resume")
        assert "pm0" in json.loads(second.remote("counters").stdout)
        second.remote("shutdown-vmm")
        assert second.wait_exit() == 0
    finally:
        second.stop()
