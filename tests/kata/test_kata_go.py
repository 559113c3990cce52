"""Kata Containers' Go runtime drives vmmkit: a replay of ``virtcontainers/clh.go``'s calls for
one sandbox, against a real vmmkit booting the team's Linux kernel. Not Kata itself (CI cannot
fetch or build it): its requests, byte for byte as its generated client and Go's ``net/http``
send them (:mod:`kata_clients`), its timeouts, and checks of each answer by what its code would
accept (:mod:`kata_models`).

The sequence (clh.go's functions):

1. ``launchClh``: ``vmmkit --api-socket <sock> --seccomp false`` (a production sandbox: no
   ``-v``, serial and console off, ``quiet``: /init's report is read through the agent);
   ``isClhRunning``:
   ``vmm.ping`` every 10 ms, up within 10 s.
2. ``StartVM`` -> ``bootVM`` under one 10 s deadline: ``vm.create`` (two PCI segments, the
   virtio-fs share on segment 1 served by ``vmmkit-vhost-user fs``, vsock CID 3, the balloon
   with free page reporting, the rootfs disk read-only), ``vm.info`` (``Created``),
   ``vm.add-net`` with the tap fd in SCM_RIGHTS (204: not booted), ``vm.boot``, ``vm.info``
   (``Running``).
3. The agent stand-in answers on vsock port 1024; the guest mounted the share read-write and
   sees its rootfs disk read-only.
4. ``hotplugAddBlockDevice`` (5 s): ``vm.add-disk`` -> 200 + ``PciDeviceInfo``, its BDF a
   ``0000:00:XX.0`` that ``clhPciInfoToPath`` takes, the guest's device at that slot.
5. ``hotplugAddNetDevice``: ``vm.add-net`` with a second tap -> 200 + ``PciDeviceInfo``.
6. ``ResizeVCPUs`` (``vm.info``, ``vm.resize desired_vcpus``, retried on 429) and
   ``ResizeMemory`` (``vm.info``, ``vm.resize desired_ram`` aligned to 128 MiB); the agent
   stand-in onlines the new vCPU and memory as Kata's agent does; ``vm.info`` reports them.
7. ``PauseVM`` / ``ResumeVM`` (1 s each).
8. ``StopVM`` -> ``terminate``: ``vmm.ping``, ``vmm.shutdown`` (3 s), the process gone in 3 s.

~2 min alone on a kvm_pvm host (one Linux boot).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kata_bodies import GO_KERNEL_PARAMS, MiB, go_hotplug_disk, go_net_config, go_vm_config
from kata_clients import (
    API_TIMEOUT,
    CREATE_BOOT_TIMEOUT,
    HOTPLUG_TIMEOUT,
    STOP_TIMEOUT,
    GoClient,
    KataError,
    Reply,
)
from kata_guest import (
    BOOT_TIMEOUT,
    Vmm,
    agent_exits,
    agent_run,
    build_initramfs,
    go_wait_vmm,
    init_lines,
    make_rootfs,
    missing_reason,
    open_tap,
    wait_agent,
    wait_guest,
    within,
)
from kata_models import go_decode, go_pci_path, go_required
from linuxboot import LINUX_DIR
from virtiofs_share import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

BOOT_VCPUS, MAX_VCPUS = 1, 2
MEMORY, HOTPLUG_SIZE = 256 * MiB, 512 * MiB
BLOCK_SIZE_MB = 128  #: the guest's memory block size (x86-64: 128 MiB), Kata's memoryBlockSizeMB
#: Kata's guest command line, then configuration-clh.toml's kernel_params (pty.legacy_count=0
#: saves ~20 s of a kvm_pvm boot, see tests/linux/linuxboot.py).
CMDLINE = f"{GO_KERNEL_PARAMS} pty.legacy_count=0"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/tmp") / f"vmmkit-kata-go-{os.getpid()}"  # sockaddr_un's 108 bytes
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def go_vm_info(client: GoClient) -> dict[str, Any]:
    """``clh.vmInfo()``: ``VmInfoGet`` with the 1 s deadline, decoded into ``VmInfo``."""
    reply = within(client.call("GET", "vm.info", timeout=API_TIMEOUT), API_TIMEOUT, "vm.info")
    info = reply.json()
    go_decode("VmInfo", info)
    go_required("VmInfo", info)
    go_required("VmConfig", info["config"], "$.config")
    go_required("CpusConfig", info["config"]["cpus"], "$.config.cpus")
    go_required("MemoryConfig", info["config"]["memory"], "$.config.memory")
    return info  # type: ignore[no-any-return]


def go_pci_info(reply: Reply, what: str) -> str:
    """An add-* answer after boot: 200 with a ``PciDeviceInfo`` whose BDF ``clhPciInfoToPath``
    takes; returns the slot."""
    assert reply.status == 200, f"{what}: {reply.status}, Kata needs 200 + PciDeviceInfo once booted"
    info = reply.json()
    go_decode("PciDeviceInfo", info)
    go_required("PciDeviceInfo", info)
    assert info["id"], f"{what}: an empty id (Kata keeps it for vm.remove-device)"
    return go_pci_path(info["bdf"])


def resize_vcpus(client: GoClient, requested: int) -> None:
    """``ResizeVCPUs``: vm.info, then vm.resize retried (20 x 20 ms) while 'Too Many Requests',
    all under one 1 s deadline."""
    info = go_vm_info(client)
    requested = min(requested, info["config"]["cpus"]["max_vcpus"])
    start = time.monotonic()
    for _attempt in range(20):
        left = API_TIMEOUT - (time.monotonic() - start)
        try:
            client.call("PUT", "vm.resize", {"desired_vcpus": requested}, timeout=max(left, 0.001))
            return
        except KataError as exc:
            if "Too Many Requests" not in str(exc):  # clh.go matches the status text
                raise
        time.sleep(0.020)
    raise AssertionError("vm.resize answered 429 twenty times")


def resize_memory(client: GoClient, requested_mb: int) -> int:
    """``ResizeMemory`` (probe off): the new size from vm.info's size and hotplug_size, aligned
    up to the block size; returns the bytes asked for."""
    info = go_vm_info(client)
    memory = info["config"]["memory"]
    max_hotplug_mb = memory.get("hotplug_size", 0) // MiB
    requested_mb = min(requested_mb, max_hotplug_mb)
    current = memory["size"]
    new = requested_mb * MiB
    assert new > current, f"the replay asks for more memory ({new}) than vm.info's size {current}"
    block = BLOCK_SIZE_MB * MiB
    hotplug = -(-(new - current) // block) * block
    new = min(current + hotplug, max_hotplug_mb * MiB)
    within(client.call("PUT", "vm.resize", {"desired_ram": new}, timeout=API_TIMEOUT), API_TIMEOUT, "vm.resize")
    return new


def guest(vsock: str, command: str) -> str:
    status, output = agent_run(vsock, command)
    assert status == 0, f"{command!r} failed in the guest ({status}): {output}"
    return output.strip()


def test_kata_go_runtime_sequence(workdir: Path) -> None:
    reason = missing_reason(need_daemon=True)
    if reason:
        pytest.skip(reason)
    initramfs = build_initramfs(workdir)
    rootfs = make_rootfs(workdir / "kata-containers.img")
    hot_disk = make_rootfs(workdir / "container-rootfs.img", 16 * MiB)
    share = workdir / "shared"
    share.mkdir()
    (share / "from-host.txt").write_text("hello from the host\n")
    daemon = Daemon(workdir, share)
    vsock = str(workdir / "clh.sock")
    vmm = Vmm(workdir, "go", verbose=False)
    client = GoClient(vmm.socket)
    taps = [open_tap(f"kgo{os.getpid() % 100000}a"), open_tap(f"kgo{os.getpid() % 100000}b")]
    try:
        # 1. launchClh
        startup = go_wait_vmm(vmm, client)
        ping = client.call("GET", "vmm.ping").json()
        go_decode("VmmPingResponse", ping)
        go_required("VmmPingResponse", ping)

        # 2. bootVM: one deadline for create .. boot
        started = time.monotonic()
        config = go_vm_config(kernel=str(LINUX_DIR / "vmlinux"), initramfs=str(initramfs), rootfs=str(rootfs),
                              cmdline=CMDLINE, vsock=vsock, fs_socket=str(daemon.socket), boot_vcpus=BOOT_VCPUS,
                              max_vcpus=MAX_VCPUS, memory=MEMORY, hotplug_size=HOTPLUG_SIZE)
        created = client.call("PUT", "vm.create", config, timeout=CREATE_BOOT_TIMEOUT)
        assert created.status == 204 and not created.body
        assert go_vm_info(client)["state"] == "Created"
        added = client.add_net(go_net_config("52:54:00:4b:41:01"), [taps[0]], timeout=CREATE_BOOT_TIMEOUT)
        assert added.status == 204 and not added.body, "before boot Kata expects 204 (no PciDeviceInfo)"
        client.call("PUT", "vm.boot", timeout=CREATE_BOOT_TIMEOUT - (time.monotonic() - started))
        info = go_vm_info(client)
        create_to_boot = time.monotonic() - started
        assert create_to_boot <= CREATE_BOOT_TIMEOUT, f"create..boot took {create_to_boot:.1f} s (Kata: 10 s)"
        assert info["state"] == "Running"
        assert info["config"]["platform"]["num_pci_segments"] == 2
        assert info["config"]["fs"][0]["pci_segment"] == 1 and info["config"]["disks"][0]["readonly"] is True

        # 3. the guest and its agent
        wait_agent(vsock, vmm, BOOT_TIMEOUT)
        lines = init_lines(vsock)
        assert f"rootfs ro=1 {8 * MiB // 512}" in lines, lines
        assert "share mounted hello from the host" in lines, lines
        assert (share / "from-guest.txt").read_text() == "written by the guest\n"
        segment1 = guest(vsock, "cat /sys/bus/pci/devices/0001:00:*/device").split()
        assert "0x105a" in segment1, f"virtio-fs (1af4:105a) is not on PCI segment 1: {segment1}"

        # 4. hotplugAddBlockDevice
        disk = within(client.call("PUT", "vm.add-disk", go_hotplug_disk(str(hot_disk), boot_vcpus=BOOT_VCPUS),
                                  timeout=HOTPLUG_TIMEOUT), HOTPLUG_TIMEOUT, "vm.add-disk")
        slot = go_pci_info(disk, "vm.add-disk")
        wait_guest(lambda: agent_run(vsock, f"ls /sys/bus/pci/devices/0000:00:{slot}.0/virtio*/block")[0] == 0,
                   f"see the hot-added disk at 0000:00:{slot}.0")
        assert guest(vsock, f"cat /sys/bus/pci/devices/0000:00:{slot}.0/virtio*/block/*/size") == str(16 * MiB // 512)

        # 5. hotplugAddNetDevice
        nic = client.add_net(go_net_config("52:54:00:4b:41:02"), [taps[1]], timeout=HOTPLUG_TIMEOUT)
        nic_slot = go_pci_info(nic, "vm.add-net")
        wait_guest(lambda: agent_run(vsock, f"ls /sys/bus/pci/devices/0000:00:{nic_slot}.0/virtio*/net")[0] == 0,
                   f"see the hot-added NIC at 0000:00:{nic_slot}.0")
        assert "52:54:00:4b:41:02" in guest(vsock, "cat /sys/class/net/*/address")

        # 6. ResizeVCPUs, ResizeMemory (Kata's agent onlines what arrived)
        resize_vcpus(client, 2)
        wait_guest(lambda: agent_run(vsock, "echo 1 > /sys/devices/system/cpu/cpu1/online")[0] == 0,
                   "online the hot-added vCPU")
        assert guest(vsock, "cat /sys/devices/system/cpu/online") == "0-1"
        assert go_vm_info(client)["config"]["cpus"]["boot_vcpus"] == 2  # ResizeVCPUs reads it next time
        asked = resize_memory(client, (MEMORY + 100 * MiB) // MiB)
        assert asked == MEMORY + 128 * MiB
        online = ("for m in /sys/devices/system/memory/memory*; do grep -q offline $m/state && "
                  "echo online > $m/state; done; grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2")
        wait_guest(lambda: int(guest(vsock, online) or 0) * 1024 > MEMORY, "online the hot-added memory")
        info = go_vm_info(client)
        assert info["config"]["memory"]["size"] == asked, "ResizeMemory reads the current size here"
        assert info.get("memory_actual_size") == asked, "GetTotalMemoryMB reads memory_actual_size"

        # 7. PauseVM, ResumeVM
        within(client.call("PUT", "vm.pause"), API_TIMEOUT, "vm.pause")
        assert go_vm_info(client)["state"] == "Paused"
        within(client.call("PUT", "vm.resume"), API_TIMEOUT, "vm.resume")
        assert go_vm_info(client)["state"] == "Running"
        assert guest(vsock, "echo back") == "back"

        assert not agent_exits(vsock), agent_exits(vsock)

        # 8. terminate
        client.call("GET", "vmm.ping", timeout=API_TIMEOUT)
        within(client.call("PUT", "vmm.shutdown", timeout=STOP_TIMEOUT), STOP_TIMEOUT, "vmm.shutdown")
        stopping = time.monotonic()
        vmm.process.wait(STOP_TIMEOUT)
        assert time.monotonic() - stopping <= STOP_TIMEOUT
        print(f"vmmkit answered vmm.ping {startup:.2f} s after launch; create..boot {create_to_boot:.2f} s")
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- the VMM's log (tail) ---\n{vmm.log()[-4000:]}") from exc
    finally:
        for fd in taps:
            os.close(fd)
        client.close()
        vmm.kill()
        daemon.stop()
