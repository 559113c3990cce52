"""A whole VM life over the API socket, with ``vmmkit-remote`` only: create, boot, pause,
resume, reboot, power button; the event monitor tells the same story."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from api_support import ch_document, check_response, served_document

from .conftest import BANNER, VmmProcess, fd_target, wait_for

GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

pytestmark = pytest.mark.requires_kvm


def test_a_whole_life_with_vmmkit_remote(vmm: VmmProcess, selftest_elf: Path) -> None:
    disk = vmm.dir / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    ping = json.loads(vmm.remote("ping").stdout)
    assert ping["pid"] == vmm.proc.pid
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("add-disk", f"path={disk},id=data")
    info = vmm.info()
    assert info["state"] == "Created" and info["config"]["disks"][0]["id"] == "data"

    vmm.remote("boot")
    assert vmm.info()["state"] == "Running"
    wait_for(lambda: vmm.heartbeats() >= 2, what="heartbeats")

    vmm.remote("pause")
    assert vmm.info()["state"] == "Paused"
    paused_at = vmm.heartbeats()
    time.sleep(2.5)  # more than two heartbeat periods
    assert vmm.heartbeats() == paused_at, "the guest made progress while paused"
    counters = json.loads(vmm.remote("counters").stdout)
    assert counters["_acpi_ged"]["power_button_presses"] == 0

    vmm.remote("resume")
    assert vmm.info()["state"] == "Running"
    wait_for(lambda: vmm.heartbeats() > paused_at, what="heartbeats after resume")

    vmm.remote("reboot")
    wait_for(lambda: vmm.output().count(BANNER) == 2, what="the banner of the second boot")
    wait_for(lambda: vmm.output().split(BANNER)[-1].count("selftest: heartbeat") >= 1,
             what="a heartbeat after the reboot")
    assert vmm.info()["state"] == "Running"

    vmm.remote("power-button")
    assert vmm.wait_exit() == 0, vmm.log.read_text()
    second_boot = vmm.output().split(BANNER)[-1]
    assert "selftest: info spin: power button pressed" in second_boot
    assert "selftest: exit 0" in second_boot
    assert not vmm.socket.exists()
    events = vmm.events()
    # The reboot resets every device: their transports report it.
    device_events = events[events.index(("vm", "rebooting")) : events.index(("vm", "rebooted"))]
    assert ("virtio-device", "reset") in device_events
    assert [e for e in events if e[0] != "virtio-device"] == [
        ("vmm", "starting"),
        ("vm", "booting"), ("vm", "booted"),
        ("vm", "pausing"), ("vm", "paused"),
        ("vm", "resuming"), ("vm", "resumed"),
        ("vm", "rebooting"), ("vm", "rebooted"),
        ("vm", "shutdown"), ("vm", "deleted"),
        ("vmm", "shutdown"),
    ]


def test_answers_while_running_match_chs_document(vmm: VmmProcess, selftest_elf: Path) -> None:
    from vmmkit.api.client import ApiClient

    client = ApiClient(str(vmm.socket))
    client.create(vmm.guest_config(selftest_elf))
    client.boot()
    for method, endpoint in (("GET", "vm.info"), ("GET", "vm.counters"), ("GET", "vmm.ping")):
        response = client.request(method, endpoint)
        check_response(ch_document(), endpoint, method, response.status, response.body)
    started = time.monotonic()
    for _ in range(20):
        client.ping()
        client.info()
    assert time.monotonic() - started < 2.0, "ordinary calls are slow while the vCPUs spin"
    # A hot-added disk whose image is missing: a clear 400, and nothing changed.
    refused = client.request("PUT", "vm.add-disk", {"path": "/tmp/vmmkit-no-such.img"}, check=False)
    assert refused.status == 400 and "vmmkit-no-such.img does not exist" in refused.json()[0]
    check_response(served_document(), "vm.add-disk", "PUT", refused.status, refused.body)
    assert not client.info()["config"].get("disks")
    assert client.request("PUT", "vm.boot", check=False).status == 405
    client.shutdown()
    assert client.info()["state"] == "Shutdown"
    assert vmm.proc.poll() is None  # vm.shutdown keeps the VMM
    client.boot()  # a new VM from the same config
    wait_for(lambda: vmm.output().count(BANNER) == 2, what="the second boot")
    client.delete()
    assert client.request("GET", "vm.info", check=False).status == 404
    client.shutdown_vmm()
    assert vmm.wait_exit() == 0
    assert vmm.events()[-2:] == [("vm", "deleted"), ("vmm", "shutdown")]


@pytest.mark.requires_interrupts
def test_nmi_reaches_the_guest(vmm: VmmProcess, selftest_elf: Path) -> None:
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    wait_for(lambda: vmm.heartbeats() >= 1, what="a heartbeat")
    vmm.remote("nmi")
    # The test guest treats any exception, NMIs included, as a failure and exits with the count
    # of FAIL lines (the CPUs report concurrently: a line may be cut by the power-off).
    status = vmm.wait_exit()
    lines = [line for line in vmm.output().splitlines() if "exception: NMI (vector 2)" in line]
    assert lines, vmm.output()
    assert status >= 1  # the guest counted its failures


def test_add_net_passes_a_tap_fd_before_boot(vmm: VmmProcess, selftest_elf: Path) -> None:
    """The tap fd travels as SCM_RIGHTS and lands in the stored config as the VMM's own fd."""
    import fcntl
    import struct

    try:
        tap = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"/dev/net/tun: {exc.strerror}")
    try:
        ifr = struct.pack("16sH", b"vktest%d", 0x0002 | 0x1000 | 0x4000)  # TAP, NO_PI, VNET_HDR
        try:
            name = fcntl.ioctl(tap, 0x400454CA, ifr)[:16].rstrip(b"\0").decode()  # TUNSETIFF
        except OSError as exc:
            pytest.skip(f"cannot create a tap device: {exc.strerror}")
        vmm.create(vmm.guest_config(selftest_elf))
        os.set_inheritable(tap, True)
        vmm.remote("add-net", f"fd=[{tap}],mac=12:34:56:78:9a:bc,id=net0", pass_fds=(tap,))
        (net,) = vmm.info()["config"]["net"]
        assert net["id"] == "net0" and net["mac"] == "12:34:56:78:9a:bc"
        (vmm_fd,) = net["fds"]
        assert fd_target(vmm.proc.pid, vmm_fd) == "/dev/net/tun"
        with open(f"/proc/{vmm.proc.pid}/fdinfo/{vmm_fd}") as fdinfo:
            assert f"iff:\t{name}" in fdinfo.read()  # the very tap we made
        # The virtio-net device is built on that fd at boot.
        vmm.remote("boot")
        assert vmm.info()["state"] == "Running"
        assert "net0" in json.loads(vmm.remote("counters").stdout)
    finally:
        os.close(tap)


def test_the_vmm_boots_a_command_line_vm_and_serves_the_api(start_vmm, selftest_elf: Path,  # noqa: ANN001
                                                            short_dir: Path) -> None:
    serial = short_dir / "serial.log"
    vmm = start_vmm("--kernel", str(selftest_elf), "--cmdline", "test=spin", "--cpus", "boot=2",
                    "--memory", "size=64M", "--serial", f"file={serial}")
    wait_for(lambda: vmm.info()["state"] == "Running", what="Running")
    wait_for(lambda: vmm.heartbeats() >= 1, what="a heartbeat")
    vmm.remote("shutdown-vmm")
    assert vmm.wait_exit() == 0
    assert vmm.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_the_api_socket_is_private_and_not_stolen(vmm: VmmProcess, short_dir: Path, vmmkit_hypervisor: str) -> None:
    import stat
    import subprocess
    import sys

    assert stat.S_IMODE(os.stat(vmm.socket).st_mode) == 0o600
    second = subprocess.run([sys.executable, "-m", "vmmkit", "--hypervisor", vmmkit_hypervisor,
                             "--api-socket", f"path={vmm.socket}"], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "in use" in second.stderr
    vmm.remote("ping")


def test_an_inherited_listening_socket(short_dir: Path, vmmkit_hypervisor: str) -> None:
    import socket
    import subprocess
    import sys

    from vmmkit.api.client import ApiClient

    path = str(short_dir / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    fd = listener.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "vmmkit", "--hypervisor", vmmkit_hypervisor,
                             "--api-socket", f"fd={fd}"], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener.close()
    try:
        assert ApiClient(path).ping()["pid"] == proc.pid
        ApiClient(path).shutdown_vmm()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_stops_the_vm_and_the_vmm(vmm: VmmProcess, selftest_elf: Path) -> None:
    import signal

    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    wait_for(lambda: vmm.heartbeats() >= 1, what="a heartbeat")
    vmm.proc.send_signal(signal.SIGTERM)
    assert vmm.wait_exit() == 128 + signal.SIGTERM
    assert vmm.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]
    assert not vmm.socket.exists()


def test_event_monitor_without_the_api(short_dir: Path, selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    import subprocess
    import sys

    from vmmkit.events import read_events

    events = short_dir / "events.json"
    result = subprocess.run([sys.executable, "-m", "vmmkit", "--hypervisor", vmmkit_hypervisor, "--kernel",
                             str(selftest_elf), "--event-monitor", f"path={events}"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "selftest: exit 0" in result.stdout
    assert [(e["source"], e["event"]) for e in read_events(events.read_text())] == [
        ("vmm", "starting"), ("vm", "booting"), ("vm", "booted"), ("vm", "shutdown"), ("vm", "deleted"),
        ("vmm", "shutdown")]


def test_a_tap_fd_added_before_boot_carries_the_guests_net_test(vmm: VmmProcess, selftest_elf: Path) -> None:
    """Kata's way: the orchestrator opens the tap (here inside a network namespace this test
    makes, with a responder on it) and hands only the fd to the VMM with vm.add-net; the test
    guest's ping/pong over virtio-net then passes."""
    import fcntl
    import struct
    import threading

    from ..netns import NetNamespace, _setns, unavailable_reason
    from ..qemu_peer import NET_OK_LINE

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)

    def open_tap(ns: NetNamespace, name: str) -> int:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                _setns(ns.path)
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000 | 0x4000))
                box["fd"] = fd
            except BaseException as exc:  # re-raised below
                box["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return int(box["fd"])

    with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
        tap = open_tap(ns, "tap0")
        try:
            vmm.create(vmm.guest_config(selftest_elf, cmdline="test=net"))
            os.set_inheritable(tap, True)
            vmm.remote("add-net", f"fd=[{tap}],mac=52:54:00:12:34:56,id=net0", pass_fds=(tap,))
        finally:
            os.close(tap)  # the VMM has its own copy now
        vmm.remote("boot")
        assert vmm.wait_exit(60) == 0, vmm.output()
    assert NET_OK_LINE in vmm.output()
    assert sorted(set(responder.pings)) == [1, 2, 3]
