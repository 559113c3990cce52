"""Kata Containers' Rust runtime (runtime-rs) drives vmmkit: a replay of
``crates/hypervisor/src/ch/{inner_hypervisor,inner_device}.rs`` through ``ch-config``'s API
calls, on ONE API connection per VMM as runtime-rs keeps it (:class:`kata_clients.RustClient`),
with VM templating as runtime-rs does it: the sandbox is restored from a template VM's snapshot
and gets its devices after the restore, as a factory-made sandbox does.

1. Template VM: ``cloud_hypervisor_launch`` (``--api-socket``, ``-v``, ``--seccomp false``),
   ``setup_comms`` (connect every 50 ms), ``ping_until_ready`` (the ping's ``features``),
   ``boot_vm`` (``vm.create`` as ``to_string_pretty``, ``vm.boot``); the agent stand-in answers;
   ``pause_vm``, ``save_vm`` (``vm.snapshot`` into the template directory, then config.json's
   ``memory.shared`` set to false), ``stop_vm`` (``vmm.shutdown``).
2. Sandbox VM: ``prepare_restore_files`` (config.json and state.json copied into the sandbox's
   directory, its vsock socket rewritten in config.json), a new VMM, ``restore_vm``
   (``vm.restore {source_url}``, ``vm.info``: ``Paused``, deserialized into ch-config's
   ``VmInfo``), ``resume_vm``; the guest's agent answers on the new vsock socket.
3. ``handle_network_device``: ``vm.add-net`` with the tap fd (num_queues 2 per queue pair);
   ``handle_block_device``: ``vm.add-disk`` -> ``PciDeviceInfo``, ``clh_pci_info_to_path``.
4. ``resize_vcpu`` (``vm.resize``, no retry), ``resize_memory`` (``vm.info``, ``vm.resize``).
5. ``pause_vm`` / ``resume_vm``, ``stop_vm``.
6. ``vmmkit --restore`` of the same template (the CLI path): ``vm.info`` asked as soon as
   ``vmm.ping`` answers is the restored VM, never a 404.

Two departures, so that the restored sandbox can be resized in step 4: Kata's template VM puts
its RAM in one memory zone backed by the template's memory file, without ``hotplug_size``, and
``vm.resize desired_ram`` is refused on a VM with zones (by Cloud Hypervisor too:
``InvalidResizeWithMemoryZones``). Here the template VM's memory is plain ``memory.shared`` RAM
with ``hotplug_size``, so config.json has no zones to patch, and the template's memory lives in
the snapshot's own files, so the sandbox's directory gets those (and the manifest) besides
config.json and state.json. Kata's own templating flow (the zone, config.json and state.json
alone) is replayed on the self-test guest in ``test_kata_contract.py``.

~2-3 min alone on a kvm_pvm host (one Linux boot, two restores).
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
from kata_bodies import RUST_KERNEL_PARAMS, MiB, rust_hotplug_disk, rust_net_config, rust_vm_config
from kata_clients import LAUNCH_TIMEOUT, KataError, RustClient
from kata_guest import (
    BOOT_TIMEOUT,
    Vmm,
    agent_exits,
    agent_run,
    build_initramfs,
    init_lines,
    make_rootfs,
    missing_reason,
    open_tap,
    wait_agent,
    wait_guest,
)
from kata_models import rust_decode, rust_pci_path
from linuxboot import LINUX_DIR

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

BOOT_VCPUS, MAX_VCPUS = 1, 2
MEMORY, HOTPLUG_SIZE = 256 * MiB, 512 * MiB
CMDLINE = f"{RUST_KERNEL_PARAMS} pty.legacy_count=0"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/tmp") / f"vmmkit-kata-rs-{os.getpid()}"  # sockaddr_un's 108 bytes
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start_hypervisor(vmm: Vmm, *, ping_limit: float = LAUNCH_TIMEOUT) -> RustClient:
    """``start_hypervisor``: connect, then ``vmm.ping`` every 50 ms on that connection until it
    answers; the ping's body must parse as JSON with an optional ``features`` list of strings
    (``handle_ch_build_features``)."""
    client = RustClient(vmm.socket, deadline=vmm.launched + ping_limit)
    while True:
        try:
            reply = client.call("GET", "vmm.ping")
            break
        except KataError:
            assert time.monotonic() - vmm.launched < ping_limit, "vmm.ping did not answer in time"
            time.sleep(0.050)
    ping = json.loads(reply.body)
    features = ping.get("features")
    assert features is None or all(isinstance(item, str) for item in features), ping
    return client


def rust_vm_info(client: RustClient) -> dict[str, Any]:
    """``cloud_hypervisor_vm_info``: a body is required, then serde into ``VmInfo``."""
    reply = client.call("GET", "vm.info")
    assert reply.body, "vm.info answered no body (runtime-rs: failed to get vminfo)"
    info = json.loads(reply.body)
    rust_decode("VmInfo", info)
    return info  # type: ignore[no-any-return]


def guest(vsock: str, command: str) -> str:
    status, output = agent_run(vsock, command)
    assert status == 0, f"{command!r} failed in the guest ({status}): {output}"
    return output.strip()


def patch_config(path: Path, **changes: Any) -> None:
    """Edit config.json as runtime-rs does (serde_json Value, written back compact, 0600)."""
    config = json.loads(path.read_bytes())
    if "vsock" in changes:
        config["vsock"]["socket"] = changes["vsock"]
    if "shared" in changes:
        config["memory"]["shared"] = changes["shared"]
    path.write_bytes(json.dumps(config, separators=(",", ":")).encode())
    path.chmod(0o600)


def test_kata_rust_runtime_sequence(workdir: Path) -> None:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    initramfs = build_initramfs(workdir)
    rootfs = make_rootfs(workdir / "kata-containers.img")
    hot_disk = make_rootfs(workdir / "container-rootfs.img", 16 * MiB)
    template_dir = workdir / "template"  # dirname of vm_template.memory_path
    sandbox_dir = workdir / "sandbox"
    sandbox_dir.mkdir()
    template_vsock = str(workdir / "template-vsock.sock")
    sandbox_vsock = str(sandbox_dir / "clh.sock")
    tap = open_tap(f"krs{os.getpid() % 100000}")
    vmms: list[Vmm] = []
    try:
        # 1. the template VM
        template = Vmm(workdir, "template")
        vmms.append(template)
        client = start_hypervisor(template)
        config = rust_vm_config(kernel=str(LINUX_DIR / "vmlinux"), initramfs=str(initramfs), rootfs=str(rootfs),
                                cmdline=CMDLINE, vsock=template_vsock, boot_vcpus=BOOT_VCPUS, max_vcpus=MAX_VCPUS,
                                memory=MEMORY, hotplug_size=HOTPLUG_SIZE)
        created = client.call("PUT", "vm.create", config, pretty=True)
        assert created.status == 204 and not created.body
        client.call("PUT", "vm.boot")
        wait_agent(template_vsock, template, BOOT_TIMEOUT)
        lines = init_lines(template_vsock)
        assert any(line.startswith("rootfs ro=1 ") for line in lines) and "share none" in lines, lines
        client.call("PUT", "vm.pause")
        client.call("PUT", "vm.snapshot", {"destination_url": f"file://{template_dir}"})
        patch_config(template_dir / "config.json", shared=False)
        client.call("PUT", "vmm.shutdown")
        template.process.wait(30)
        client.close()

        # 2. the sandbox, restored from the template
        for name in os.listdir(template_dir):  # runtime-rs copies config.json and state.json only
            shutil.copy2(template_dir / name, sandbox_dir / name)
        patch_config(sandbox_dir / "config.json", vsock=sandbox_vsock)
        sandbox = Vmm(workdir, "sandbox")
        vmms.append(sandbox)
        client = start_hypervisor(sandbox)
        restored = client.call("PUT", "vm.restore", {"source_url": f"file://{sandbox_dir}"})
        assert restored.status == 204 and not restored.body
        info = rust_vm_info(client)
        assert info["state"] == "Paused", info["state"]
        assert info["config"]["memory"]["shared"] is False and info["config"]["vsock"]["socket"] == sandbox_vsock
        client.call("PUT", "vm.resume")
        assert guest(sandbox_vsock, "echo restored") == "restored"

        # 3. handle_network_device, handle_block_device
        nic = client.call("PUT", "vm.add-net", rust_net_config("52:54:00:4b:52:01"), fds=[tap])
        assert nic.status == 200, nic  # runtime-rs logs the body only; CH answers 200 + PciDeviceInfo
        rust_decode("PciDeviceInfo", json.loads(nic.body))
        disk = client.call("PUT", "vm.add-disk", rust_hotplug_disk(str(hot_disk)))
        assert disk.status == 200 and disk.body, "handle_block_device reads the PciDeviceInfo"
        pci_info = json.loads(disk.body)
        rust_decode("PciDeviceInfo", pci_info)
        slot = rust_pci_path(pci_info["bdf"])
        wait_guest(lambda: agent_run(sandbox_vsock, f"ls /sys/bus/pci/devices/0000:00:{slot}.0/virtio*/block")[0]
                   == 0, f"see the hot-added disk at 0000:00:{slot}.0")
        assert "52:54:00:4b:52:01" in guest(sandbox_vsock, "cat /sys/class/net/*/address")

        # 4. resize_vcpu (no retry in runtime-rs), resize_memory
        client.call("PUT", "vm.resize", {"desired_vcpus": 2, "desired_ram": None, "desired_balloon": None})
        wait_guest(lambda: agent_run(sandbox_vsock, "echo 1 > /sys/devices/system/cpu/cpu1/online")[0] == 0,
                   "online the hot-added vCPU")
        assert guest(sandbox_vsock, "cat /sys/devices/system/cpu/online") == "0-1"
        current = rust_vm_info(client)["config"]["memory"]["size"]
        assert current == MEMORY
        new_total = current + 128 * MiB  # 100 MiB asked, aligned up to the 128 MiB block
        client.call("PUT", "vm.resize", {"desired_vcpus": None, "desired_ram": new_total, "desired_balloon": None})
        info = rust_vm_info(client)
        assert info["config"]["memory"]["size"] == new_total and info["config"]["cpus"]["boot_vcpus"] == 2

        # 5. pause, resume, stop
        client.call("PUT", "vm.pause")
        assert rust_vm_info(client)["state"] == "Paused"
        client.call("PUT", "vm.resume")
        assert guest(sandbox_vsock, "echo alive") == "alive"
        assert not agent_exits(sandbox_vsock), agent_exits(sandbox_vsock)
        client.call("PUT", "vmm.shutdown")
        sandbox.process.wait(30)
        client.close()

        # 6. vmmkit --restore: vm.info right after the first answered ping
        cli_dir = workdir / "cli-restore"
        shutil.copytree(template_dir, cli_dir)
        patch_config(cli_dir / "config.json", vsock=str(workdir / "cli-vsock.sock"))
        cli = Vmm(workdir, "cli", extra=("--restore", f"source_url=file://{cli_dir}"))
        vmms.append(cli)
        client = start_hypervisor(cli)
        info = rust_vm_info(client)
        assert info["state"] == "Paused", info
        client.call("PUT", "vmm.shutdown")
        cli.process.wait(30)
        client.close()
    except Exception as exc:
        logs = "\n".join(f"--- {vmm.log_path.name} (tail) ---\n{vmm.log()[-3000:]}" for vmm in vmms)
        raise AssertionError(f"{exc}\n{logs}") from exc
    finally:
        os.close(tap)
        for vmm in vmms:
            vmm.kill()

