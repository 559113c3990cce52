"""Kata Containers' contract with the VMM, without booting Linux: a real vmmkit process
launched as Kata launches it takes both runtimes' ``vm.create`` bodies and pre-boot ``vm.add-*``
calls (204), its ``vm.info`` decodes into both runtimes' models, an idle API connection stays
usable (runtime-rs keeps one for the sandbox's life), and the validators of :mod:`kata_models`
reject what Kata's decoders reject.

VM templating as runtime-rs does it (a template VM in a memory zone backed by the template's
file, snapshotted, its config.json edited, restored into new VMMs from config.json and
state.json alone) runs here on the self-test guest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kata_bodies import (
    MiB,
    go_hotplug_disk,
    go_net_config,
    go_vm_config,
    rust_hotplug_disk,
    rust_net_config,
    rust_vm_config,
    template_vm_config_memory,
)
from kata_clients import API_TIMEOUT, CREATE_BOOT_TIMEOUT, GoClient, KataError, RustClient
from kata_guest import VMMKIT, Vmm, go_wait_vmm, open_tap, within
from kata_models import Rejected, go_decode, go_pci_path, go_required, rust_decode

pytestmark = [pytest.mark.skipif(not VMMKIT.is_file(), reason=f"{VMMKIT} is not installed")]


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path("/tmp") / f"vmmkit-kata-c-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _paths(workdir: Path) -> dict[str, Any]:
    for name in ("vmlinux", "init.cpio", "rootfs.img", "disk.img"):
        (workdir / name).write_bytes(b"\0" * 4096)
    return {"kernel": str(workdir / "vmlinux"), "initramfs": str(workdir / "init.cpio"),
            "rootfs": str(workdir / "rootfs.img"), "cmdline": "panic=1", "vsock": str(workdir / "clh.sock"),
            "boot_vcpus": 1, "max_vcpus": 2, "memory": 256 * MiB, "hotplug_size": 512 * MiB}


def _tap_or_skip(name: str) -> int:
    try:
        return open_tap(name)
    except OSError as exc:
        pytest.skip(f"cannot open a tap ({exc.strerror}): Kata passes tap fds to vm.add-net")


def test_go_runtime_create_and_cold_plug(workdir: Path) -> None:
    paths = _paths(workdir)
    vmm = Vmm(workdir, "go")
    client = GoClient(vmm.socket)
    tap = _tap_or_skip(f"kc{os.getpid() % 100000}g")
    try:
        assert go_wait_vmm(vmm, client) <= 10.0
        ping = client.call("GET", "vmm.ping").json()
        go_decode("VmmPingResponse", ping)
        go_required("VmmPingResponse", ping)
        body = go_vm_config(fs_socket=str(workdir / "virtiofsd.sock"), **paths)
        reply = within(client.call("PUT", "vm.create", body, timeout=CREATE_BOOT_TIMEOUT), CREATE_BOOT_TIMEOUT,
                       "vm.create")
        assert reply.status == 204 and not reply.body
        added = client.add_net(go_net_config("52:54:00:4b:43:01"), [tap], timeout=API_TIMEOUT)
        assert added.status == 204 and not added.body, "before boot: 204, no PciDeviceInfo"
        disk = client.call("PUT", "vm.add-disk", go_hotplug_disk(str(workdir / "disk.img"), boot_vcpus=1))
        assert disk.status == 204 and not disk.body
        info = within(client.call("GET", "vm.info"), API_TIMEOUT, "vm.info").json()
        go_decode("VmInfo", info)
        go_required("VmInfo", info)
        assert info["state"] == "Created"
        config = info["config"]
        assert config["cpus"]["boot_vcpus"] == 1 and config["cpus"]["max_vcpus"] == 2
        assert config["memory"]["size"] == 256 * MiB and config["memory"]["hotplug_size"] == 512 * MiB
        assert config["platform"]["num_pci_segments"] == 2 and config["fs"][0]["pci_segment"] == 1
        assert [d["readonly"] for d in config["disks"]] == [True, False]
        assert config["net"][0]["mac"] == "52:54:00:4b:43:01"
        assert config["balloon"]["free_page_reporting"] is True and config["vsock"]["cid"] == 3
        within(client.call("PUT", "vmm.shutdown", timeout=3.0), 3.0, "vmm.shutdown")
        vmm.process.wait(3.0)
    finally:
        os.close(tap)
        client.close()
        vmm.kill()


def test_rust_runtime_create_and_cold_plug_on_one_connection(workdir: Path) -> None:
    paths = _paths(workdir)
    vmm = Vmm(workdir, "rust")
    tap = _tap_or_skip(f"kc{os.getpid() % 100000}r")
    client = RustClient(vmm.socket, deadline=time.monotonic() + 10.0)
    try:
        while True:
            try:
                client.call("GET", "vmm.ping")
                break
            except KataError:
                time.sleep(0.05)
        assert client.call("PUT", "vm.create", rust_vm_config(**paths), pretty=True).status == 204
        assert client.call("PUT", "vm.add-net", rust_net_config("52:54:00:4b:43:02"), fds=[tap]).status == 204
        assert client.call("PUT", "vm.add-disk", rust_hotplug_disk(str(workdir / "disk.img"))).status == 204
        info = json.loads(client.call("GET", "vm.info").body)
        rust_decode("VmInfo", info)
        assert info["state"] == "Created" and info["config"]["net"][0]["num_queues"] == 2
        client.call("PUT", "vmm.shutdown")
        vmm.process.wait(3.0)
    finally:
        os.close(tap)
        client.close()
        vmm.kill()


@pytest.mark.slow
def test_an_idle_connection_stays_usable(workdir: Path) -> None:
    """runtime-rs sends a sandbox's calls on the connection it opened at launch, however long
    the sandbox lives (vmmkit closed idle connections after 30 s before issue #21)."""
    vmm = Vmm(workdir, "idle")
    client = RustClient(vmm.socket, deadline=time.monotonic() + 10.0)
    try:
        while True:
            try:
                client.call("GET", "vmm.ping")
                break
            except KataError:
                time.sleep(0.05)
        time.sleep(35.0)
        assert client.call("GET", "vmm.ping").status == 200
        client.call("PUT", "vmm.shutdown")
    finally:
        client.close()
        vmm.kill()


def _heartbeats(vmm: Vmm) -> list[int]:
    """The self-test guest's heartbeats on the VMM's serial (``Tty``: its stdout, in its log)."""
    return [int(line.split()[-1]) for line in vmm.log().splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def _wait(predicate: Any, what: str, vmm: Vmm, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {vmm.log()[-2000:]}"
        time.sleep(0.05)


def _rust_connect(vmm: Vmm) -> RustClient:
    """``cloud_hypervisor_setup_comms`` then ``ping_until_ready`` (every 50 ms)."""
    client = RustClient(vmm.socket, deadline=time.monotonic() + 10.0)
    while True:
        try:
            client.call("GET", "vmm.ping")
            return client
        except KataError:
            time.sleep(0.05)


def _rust_edit_config(path: Path, edit: Any) -> None:
    """runtime-rs's ``write_json_file``: serde_json Value written back compact, mode 0600."""
    config = json.loads(path.read_bytes())
    edit(config)
    path.write_bytes(json.dumps(config, separators=(",", ":")).encode())
    path.chmod(0o600)


def _unshare(config: dict[str, Any]) -> None:
    """``patch_snapshot_memory_shared(config.json, false)``: memory.shared and every zone's."""
    config["memory"]["shared"] = False
    for zone in config["memory"]["zones"]:
        zone["shared"] = False


@pytest.mark.requires_kvm
def test_vm_templating_from_a_memory_zone_as_runtime_rs_does_it(workdir: Path) -> None:
    """runtime-rs's VM templating (``inner_hypervisor.rs``), on the self-test guest (cheap):
    the template VM's RAM is one shared zone backed by the template's memory file
    (``template_memory_config``); ``save_vm`` snapshots it into the file's directory and sets
    ``shared: false`` in config.json; ``prepare_restore_files`` copies only config.json and
    state.json into the sandbox's directory (its vsock socket rewritten); a new VMM gets
    ``vm.restore`` (then ``vm.info``: Paused) and ``vm.resume``: the guest's heartbeat goes on
    from where the template stopped, twice from one template, whose memory file the sandboxes
    only read (copy-on-write)."""
    selftest = Path(__file__).resolve().parents[1] / "guests" / "build" / "x86_64" / "selftest.elf"
    if not selftest.is_file():
        pytest.skip(f"{selftest} is not built (make -C tests/guests)")
    template_dir = workdir / "template"
    template_dir.mkdir()
    memory_path = template_dir / "memory"
    with open(memory_path, "wb") as f:  # Kata's factory creates it at the VM's size (template.go)
        f.truncate(256 * MiB)
    paths = _paths(workdir)
    paths["kernel"] = str(selftest)
    paths["initramfs"] = None
    paths["cmdline"] = "test=spin"  # the self-test guest's heartbeat on the serial (Tty: the VMM's log)
    body = rust_vm_config(**paths)
    body["memory"] = template_vm_config_memory(256 * MiB, str(memory_path))
    vmms: list[Vmm] = []
    try:
        # the template VM: boot_vm, pause_vm, save_vm, stop_vm
        template = Vmm(workdir, "tmpl")
        vmms.append(template)
        client = _rust_connect(template)
        assert client.call("PUT", "vm.create", body, pretty=True).status == 204
        info = json.loads(client.call("GET", "vm.info").body)
        rust_decode("VmInfo", info)
        assert [(z["id"], z["size"], z["file"]) for z in info["config"]["memory"]["zones"]] == [
            ("mem0", 256 * MiB, str(memory_path))]
        client.call("PUT", "vm.boot")
        _wait(lambda: len(_heartbeats(template)) >= 2, "the template's heartbeat", template)
        client.call("PUT", "vm.pause")
        client.call("PUT", "vm.snapshot", {"destination_url": f"file://{template_dir}"})
        _rust_edit_config(template_dir / "config.json", _unshare)
        last = _heartbeats(template)[-1]
        client.call("PUT", "vmm.shutdown")
        template.process.wait(30)
        client.close()
        assert sorted(p.name for p in template_dir.iterdir() if not p.name.startswith("memory-")) == [
            "config.json", "memory", "snapshot.json", "state.json"]
        assert not list(template_dir.glob("memory-*")), "the zone's RAM is in the template's memory file"
        template_ram = memory_path.read_bytes()

        for name in ("sb1", "sb2"):  # two sandboxes from one template
            sandbox_dir = workdir / name
            sandbox_dir.mkdir(mode=0o750)
            for artifact in ("config.json", "state.json"):  # copy_template_artifact: the bytes and the mode
                shutil.copy2(template_dir / artifact, sandbox_dir / artifact)
            vsock = str(sandbox_dir / "clh.sock")
            _rust_edit_config(sandbox_dir / "config.json", lambda c, vsock=vsock: c["vsock"].update(socket=vsock))
            sandbox = Vmm(workdir, name)
            vmms.append(sandbox)
            client = _rust_connect(sandbox)
            restored = client.call("PUT", "vm.restore", {"source_url": f"file://{sandbox_dir}"})
            assert restored.status == 204 and not restored.body
            info = json.loads(client.call("GET", "vm.info").body)
            rust_decode("VmInfo", info)
            assert info["state"] == "Paused" and info["config"]["vsock"]["socket"] == vsock
            assert info["config"]["memory"]["zones"][0]["shared"] is False
            client.call("PUT", "vm.resume")
            _wait(lambda sandbox=sandbox: len(_heartbeats(sandbox)) >= 2, f"{name}'s heartbeat", sandbox)
            assert _heartbeats(sandbox)[:2] == [last + 1, last + 2], _heartbeats(sandbox)  # no gap, no reboot
            client.call("PUT", "vm.pause")
            client.call("PUT", "vmm.shutdown")
            sandbox.process.wait(30)
            client.close()
        assert memory_path.read_bytes() == template_ram, "a sandbox wrote the template's memory file"
    except Exception as exc:
        logs = "\n".join(f"--- {vmm.log_path.name} (tail) ---\n{vmm.log()[-3000:]}" for vmm in vmms)
        raise AssertionError(f"{exc}\n{logs}") from exc
    finally:
        for vmm in vmms:
            vmm.kill()


# -- the validators reject what Kata's decoders reject ----------------------------------------


def _info() -> dict[str, Any]:
    return {"state": "Running", "config": {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2, "max_phys_bits": 46},
        "memory": {"size": 256 * MiB}, "payload": {"kernel": "/k"},
        "serial": {"mode": "Tty"}, "console": {"mode": "Off"}}}


def test_the_validators_accept_a_minimal_answer_and_reject_kata_breakers() -> None:
    go_decode("VmInfo", _info())
    rust_decode("VmInfo", _info())
    broken = _info()
    del broken["config"]["cpus"]["max_phys_bits"]  # u8 without #[serde(default)]
    with pytest.raises(Rejected, match="max_phys_bits"):
        rust_decode("VmInfo", broken)
    go_decode("VmInfo", broken)  # Go reads it as absent
    for edit, runtime in ((lambda c: c["serial"].update(mode="Socket"), rust_decode),
                          (lambda c: c["cpus"].update(boot_vcpus="1"), go_decode),
                          (lambda c: c["memory"].update(size=-1), rust_decode),
                          (lambda c: c["cpus"].update(boot_vcpus=1.5), go_decode)):
        broken = _info()
        edit(broken["config"])
        with pytest.raises(Rejected):
            runtime("VmInfo", broken)
    with pytest.raises(Rejected, match="unknown variant"):
        rust_decode("VmInfo", {**_info(), "state": "Booting"})
    assert go_pci_path("0000:00:05.0") == "05"
    for bdf in ("0001:00:05.0", "0000:01:05.0", "00:05.0", "0000:00:5.0", "0000:00:05.1", "0000:00:20.0"):
        with pytest.raises(Rejected):
            go_pci_path(bdf)
