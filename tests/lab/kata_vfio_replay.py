"""Inside a lab (AArch64 or x86-64): Kata Containers' Go runtime (``virtcontainers/clh.go``) starts a
debug sandbox on vmmkit with VFIO devices, in Kata's shapes (issue 21's VFIO step; the host side
and what it checks: ``tests/lab/test_lab_kata_vfio_{aarch64,x86_64}.py``). Not Kata itself: its calls, through
the replay's Go client (``tests/kata/kata_clients.py``) with the bodies of ``kata_bodies.py``.

1. virtiofsd's stand-in (``vmmkit-vhost-user fs``), then ``launchClh``: ``vmmkit --api-socket
   <sock> -v --seccomp false`` (debug, ``hypervisor_loglevel`` 1), ``vmm.ping`` every 10 ms.
2. ``bootVM``: ``vm.create`` with the sandbox's ``VmConfig`` and the VFIO device Kata's
   ``AddDevice`` put in ``devices`` (``coldPlugVFIODevice``: both runtimes cold-plug a VFIO device
   this way, in ``vm.create``; neither sends ``vm.add-device`` before ``vm.boot``), ``vm.info``,
   ``vm.boot``, ``vm.info``.
3. The guest (the lab's Debian kernel, ``lab/vfio/nvme-init.sh``) drives the NVMe controller
   with its own ``nvme`` driver; its lines come on the serial port (``Tty``: a debug sandbox).
   Kata's body goes in unchanged first; where ``vm.boot`` refuses it by name (vmmkit's AArch64
   machine), the refusal is printed and the replay departs from Kata (:data:`DEPARTURES`).
4. ``hotPlugVFIODevice``: ``vm.add-device`` of the edu (5 s), which Kata needs answered 200 with
   a ``PciDeviceInfo`` whose ``bdf`` is ``0000:00:XX.0`` (the guest, standing in for Kata's agent,
   reports the function at that slot); then ``HotplugRemoveDevice`` (``vm.remove-device``, 5 s) of
   the answer's id, or of the cold-plugged one if the hot-plug was refused; the guest sees it go.
5. ``StopVM``: ``vmm.ping``, ``vmm.shutdown`` (3 s), the process gone.

Each step prints ``VMMKIT-KATA: <step> ...`` with the status and seconds; a step Kata would fail
prints ``VMMKIT-KATA: refused <step> ...`` (hot-plug and removal on AArch64: see the host tests)
or ``VMMKIT-KATA: FAIL ...`` and ends the run (exit 1). The guest's lines pass through.

    python3 tests/lab/kata_vfio_replay.py --cold 0000:00:03.0 --hot 0000:00:02.0 \\
        --kernel /lab/files/Image --initramfs /tmp/kata.cpio
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "kata"))

from kata_bodies import (  # noqa: E402
    GO_ARM64_DEBUG_KERNEL_PARAMS,
    GO_X86_64_DEBUG_KERNEL_PARAMS,
    MiB,
    go_device_config,
    go_vm_config,
)
from kata_clients import (  # noqa: E402
    API_TIMEOUT,
    CREATE_BOOT_TIMEOUT,
    HOTPLUG_TIMEOUT,
    LAUNCH_TIMEOUT,
    PING_INTERVAL,
    STOP_TIMEOUT,
    GoClient,
    KataError,
    KataTimeout,
    Reply,
)
from kata_models import Rejected, go_decode, go_pci_path, go_required  # noqa: E402

#: Kata's device id of a cold-plugged VFIO function: ``MakeNameID("vfio", <device id><index>, 31)``.
COLD_ID = "vfio-6b6174617666696f30303030"
#: The sandbox: Kata's default_vcpus 1, default_maxvcpus the host's CPUs (the lab's 2); its
#: default_memory is 2048 MiB, the lab's host has 1 GiB: 256 MiB.
BOOT_VCPUS, MAX_VCPUS, MEMORY, HOTPLUG_SIZE = 1, 2, 256 * MiB, 512 * MiB
#: How long the VMM may take to answer and the nested guest to report (the lab emulates its host:
#: ~10-20 s and ~1 min here); Kata's own limits are printed beside the measured seconds.
GUEST_TIMEOUT = 600.0


def say(text: str) -> None:
    print(f"VMMKIT-KATA: {text}", flush=True)


class Failed(Exception):
    """A step Kata would fail, or a check of this replay."""


class Vmm:
    """The VMM as Kata launches it, its output (the guest's serial port with it) echoed and kept."""

    def __init__(self, socket_path: str) -> None:
        self.launched = time.monotonic()
        self.process = subprocess.Popen(["vmmkit", "--api-socket", socket_path, "-v", "--seccomp", "false"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            print(line, flush=True)
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if prefix in line:
                        return line[line.index(prefix):]
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise Failed(f"no {prefix!r} from the guest within {timeout:g} s")
                self._changed.wait(min(left, 1.0))


def timed(reply: Reply, limit: float, what: str) -> Reply:
    """Kata's deadline for the call; in the lab, printed rather than enforced (see the host test)."""
    over = " OVER Kata's deadline" if reply.seconds > limit else ""
    say(f"{what}: {reply.status} in {reply.seconds:.2f} s (Kata: {limit:g} s){over}")
    return reply


def vm_info(client: GoClient, what: str) -> dict[str, Any]:
    """``clh.vmInfo()`` decoded into the Go client's ``VmInfo``."""
    reply = timed(client.call("GET", "vm.info", timeout=60.0), API_TIMEOUT, what)
    info = reply.json()
    go_decode("VmInfo", info)
    go_required("VmInfo", info)
    go_required("VmConfig", info["config"], "$.config")
    for index, device in enumerate(info["config"].get("devices") or []):
        go_required("DeviceConfig", device, f"$.config.devices[{index}]")
    return info  # type: ignore[no-any-return]


def debug_kernel_params() -> str:
    """``getNonUserDefinedKernelParams`` with debug, for this machine (``runtime.GOARCH``)."""
    params: str = GO_ARM64_DEBUG_KERNEL_PARAMS if platform.machine() == "aarch64" else GO_X86_64_DEBUG_KERNEL_PARAMS
    return params


def _no_memory_hotplug(config: dict[str, Any]) -> str:
    del config["memory"]["hotplug_size"]
    return "trimmed: memory.hotplug_size (no ACPI memory hotplug)"


def _virtio_over_pci(config: dict[str, Any]) -> str:
    config["platform"]["virtio_transport"] = "pci"
    return "added: platform.virtio_transport pci (the machine's default is virtio-mmio: a backend without a GICv3 ITS)"


#: Where vmmkit refuses Kata's body by name at ``vm.boot`` (its AArch64 machine: no ACPI memory
#: hotplug, though Go always sends ``hotplug_size``; virtio-mmio by default where the backend has
#: no GICv3 ITS, which cannot take ``fs``'s ``pci_segment`` 1; KVM has one, and its default is
#: virtio-pci), what the replay changes then: the refusal's words -> the change.
#: ``platform.virtio_transport`` is a vmmkit extension Kata cannot send: Kata would stop at the
#: refusal. On x86-64 none applies.
DEPARTURES: dict[str, Callable[[dict[str, Any]], str]] = {
    "this architecture has no ACPI memory hotplug": _no_memory_hotplug,
    "goes on virtio-mmio": _virtio_over_pci,
}


def create_and_boot(client: GoClient, config: dict[str, Any]) -> float:
    """``bootVM``: ``vm.create``, ``vm.info``, ``vm.boot``; where ``vm.boot`` refuses Kata's body
    for a reason in :data:`DEPARTURES`, the refusal is printed, the VM deleted, the body changed
    and created again. Returns the seconds of the last create..boot."""
    while True:
        started = time.monotonic()
        created = timed(client.call("PUT", "vm.create", config, timeout=120.0), CREATE_BOOT_TIMEOUT, "vm.create")
        if created.status != 204 or created.body:
            raise Failed(f"vm.create: {created.status} {created.body!r}")
        info = vm_info(client, "vm.info")
        say(f"state {info['state']} devices {devices_of(info)}")
        try:
            booted = timed(client.call("PUT", "vm.boot", timeout=120.0), CREATE_BOOT_TIMEOUT, "vm.boot")
        except KataError as exc:
            change = next((fix for words, fix in DEPARTURES.items() if words in str(exc)), None)
            if change is None:
                raise
            say(f"refused vm.boot of this body: {exc}")
            client.call("PUT", "vm.delete", timeout=60.0)
            say(change(config))
            continue
        if booted.status != 204 or booted.body:
            raise Failed(f"vm.boot: {booted.status} {booted.body!r}")
        return time.monotonic() - started


def devices_of(info: dict[str, Any]) -> str:
    return json.dumps(info["config"].get("devices"), sort_keys=True)


def run(args: argparse.Namespace, work: Path) -> None:
    cold, hot = f"/sys/bus/pci/devices/{args.cold}", f"/sys/bus/pci/devices/{args.hot}"
    share = work / "shared"
    share.mkdir(exist_ok=True)
    rootfs = work / "kata-containers.img"
    with open(rootfs, "wb") as f:
        f.truncate(8 * MiB)
    fs_socket, vsock, api = str(work / "vfs.sock"), str(work / "kata.hvsock"), str(work / "clh-api.sock")

    # 1. StartVM: virtiofsd first, then launchClh and isClhRunning
    daemon = subprocess.Popen(["vmmkit-vhost-user", "fs", "--socket-path", fs_socket, "--shared-dir", str(share)],
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(fs_socket):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise Failed("the virtio-fs daemon did not create its socket")
            time.sleep(0.05)
        vmm = Vmm(api)
        client = GoClient(api)
        try:
            sequence(args, client, vmm, cold=cold, hot=hot, rootfs=str(rootfs), fs_socket=fs_socket, vsock=vsock)
        finally:
            client.close()
            if vmm.process.poll() is None:
                vmm.process.kill()
                vmm.process.wait()
    finally:
        daemon.terminate()
        daemon.wait(30)


def sequence(args: argparse.Namespace, client: GoClient, vmm: Vmm, *, cold: str, hot: str, rootfs: str,
             fs_socket: str, vsock: str) -> None:
    while True:
        if vmm.process.poll() is not None:
            raise Failed(f"the VMM exited ({vmm.process.returncode}) before answering vmm.ping")
        try:
            ping = client.call("GET", "vmm.ping", timeout=API_TIMEOUT)
            break
        except (OSError, KataError, KataTimeout):
            client.close()
        if time.monotonic() - vmm.launched > GUEST_TIMEOUT:
            raise Failed(f"vmm.ping did not answer within {GUEST_TIMEOUT:g} s of the launch")
        time.sleep(PING_INTERVAL)
    up = time.monotonic() - vmm.launched
    go_decode("VmmPingResponse", ping.json())
    go_required("VmmPingResponse", ping.json())
    over = " OVER Kata's deadline" if up > LAUNCH_TIMEOUT else ""
    say(f"vmm.ping: {ping.status} {up:.2f} s after the launch (Kata: {LAUNCH_TIMEOUT:g} s){over}")

    # 2. bootVM
    config = go_vm_config(kernel=args.kernel, initramfs=args.initramfs, rootfs=rootfs,
                          cmdline=f"{debug_kernel_params()} {args.kernel_params}", vsock=vsock,
                          fs_socket=fs_socket, boot_vcpus=BOOT_VCPUS, max_vcpus=MAX_VCPUS, memory=MEMORY,
                          hotplug_size=HOTPLUG_SIZE, debug=True,
                          devices=[go_device_config(cold, COLD_ID)])
    total = create_and_boot(client, config)
    info = vm_info(client, "vm.info")
    over = " OVER Kata's deadline" if total > CREATE_BOOT_TIMEOUT else ""
    say(f"create..boot {total:.2f} s (Kata: {CREATE_BOOT_TIMEOUT:g} s){over}")
    say(f"state {info['state']} devices {devices_of(info)} segments {info['config']['platform']['num_pci_segments']}")

    # 3. the guest drives the cold-plugged controller
    line = vmm.wait_line("VMMKIT-NVME: waiting", GUEST_TIMEOUT)
    say(f"guest: {line}")

    # 4. hotPlugVFIODevice (the guest's PCI rescan stands in for the agent's wait for the device),
    # then HotplugRemoveDevice of it (the id kept from the answer), else of the cold-plugged one
    remove_id = COLD_ID
    try:
        added = timed(client.call("PUT", "vm.add-device", go_device_config(hot), timeout=HOTPLUG_TIMEOUT * 6),
                      HOTPLUG_TIMEOUT, "vm.add-device")
        pci = added.json()
        go_decode("PciDeviceInfo", pci)
        go_required("PciDeviceInfo", pci)
        slot = go_pci_path(pci["bdf"])
        say(f"vm.add-device: PciDeviceInfo id {pci['id']} bdf {pci['bdf']} slot {slot}")
        remove_id = pci["id"]
        say(f"guest: {vmm.wait_line(f'VMMKIT-NVME: pci + 0000:00:{slot}.0 ', GUEST_TIMEOUT)}")
    except (KataError, Rejected, json.JSONDecodeError) as exc:
        say(f"refused vm.add-device: {exc}")
    try:
        timed(client.call("PUT", "vm.remove-device", {"id": remove_id}, timeout=HOTPLUG_TIMEOUT * 12),
                        HOTPLUG_TIMEOUT, "vm.remove-device")
        if remove_id != COLD_ID:
            say(f"guest: {vmm.wait_line(f'VMMKIT-NVME: pci - 0000:00:{slot}.0', GUEST_TIMEOUT)}")
    except KataError as exc:
        say(f"refused vm.remove-device: {exc}")
    info = vm_info(client, "vm.info")
    say(f"state {info['state']} devices {devices_of(info)}")

    # 5. StopVM
    client.call("GET", "vmm.ping", timeout=API_TIMEOUT)
    timed(client.call("PUT", "vmm.shutdown", timeout=60.0), STOP_TIMEOUT, "vmm.shutdown")
    stopping = time.monotonic()
    try:
        status = vmm.process.wait(60)
    except subprocess.TimeoutExpired:
        raise Failed("the VMM did not exit within 60 s of vmm.shutdown") from None
    say(f"the VMM exited {status} {time.monotonic() - stopping:.2f} s after vmm.shutdown (Kata: {STOP_TIMEOUT:g} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cold", required=True, help="BDF of the function cold-plugged (bound to vfio-pci)")
    parser.add_argument("--hot", required=True, help="BDF of the function Kata hot-plugs (bound to vfio-pci)")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initramfs", required=True)
    parser.add_argument("--kernel-params", default="", help="configuration-clh.toml's kernel_params")
    args = parser.parse_args()
    work = Path("/tmp/kata-vfio")
    work.mkdir(exist_ok=True)
    try:
        run(args, work)
    except (Failed, KataError, KataTimeout, Rejected, OSError) as exc:
        say(f"FAIL {type(exc).__name__}: {exc}")
        return 1
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
