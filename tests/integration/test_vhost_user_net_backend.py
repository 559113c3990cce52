"""``vmmkit-vhost-user net`` judged by real frontends: QEMU 7.2's ``-netdev vhost-user`` with
``virtio-net-pci`` (TCG) and vmmkit's own ``--net vhost_user=on``, each running the x86-64 test
guest's net test (three ``vmmkit-ping <n>`` frames out, the ``vmmkit-pong <n>`` answers back)
through our backend to a responder on the tap, inside a network namespace (netns.py), where the
backend runs. The host side checks what crossed the tap: the pings, from the guest's MAC.

Needs root (namespaces, taps). Alone on the host: the QEMU test ~3 s, the vmmkit test ~3 s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guest_output import selftest_lines
from .netns import NetNamespace, PingResponder, unavailable_reason
from .qemu_peer import GUEST_MAC, NET_OK_LINE, QEMU, guest_status, qemu_accel, qemu_available

GUEST_ARCH = "x86_64"
pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


class NetDaemon:
    """``vmmkit-vhost-user net`` on ``tap`` inside ``ns``."""

    def __init__(self, ns: NetNamespace, socket: Path, tap: str) -> None:
        self.socket, self.log = socket, socket.with_suffix(".log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*ns.exec_prefix(), sys.executable, "-m", "vmmkit_vhost_user.cli", "net", "--socket", str(socket),
                 "--tap", tap, "-v"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.02)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/tmp") / f"vmmkit-vunet-{os.getpid()}-{tmp_path.name[-20:]}"  # sockaddr_un's 108 bytes
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check(lines: list[str], responder: PingResponder, log: str, explain: str) -> None:
    assert NET_OK_LINE in lines, explain
    assert sorted(set(responder.pings)) == [1, 2, 3], explain
    assert responder.macs == {bytes.fromhex(GUEST_MAC.replace(":", ""))}, explain
    assert "Traceback" not in log and "stopped" not in log, log
    # What the daemon counted when the frontend left: the three pings out, the pongs in.
    assert "tx_frames=" in log and "rx_frames=" in log, log


@pytest.mark.skipif(not qemu_available(), reason=f"{QEMU} is not installed")
def test_qemu_runs_the_guest_net_test_through_our_backend(workdir: Path, selftest_elf: Path) -> None:
    with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
        daemon = NetDaemon(ns, workdir / "net.sock", "tap0")
        try:
            argv = [QEMU, "-M", "q35", "-accel", qemu_accel(), "-m", "128M", "-smp", "1", "-nodefaults",
                    "-no-user-config", "-nographic", "-serial", "stdio",
                    "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                    "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
                    "-chardev", f"socket,id=vu0,path={daemon.socket}", "-netdev", "vhost-user,id=n0,chardev=vu0",
                    "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile=,addr=0x4,disable-legacy=on",
                    "-kernel", str(selftest_elf), "-append", "test=net"]
            result = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=240,
                                    stdin=subprocess.DEVNULL)
        finally:
            log = daemon.stop()
    explain = f"--- stdout ---\n{result.stdout[-4000:]}--- stderr ---\n{result.stderr[-2000:]}--- daemon ---\n{log}"
    assert guest_status(result.returncode) == 0, explain
    _check(selftest_lines(result.stdout), responder, log, explain)


@pytest.mark.requires_kvm
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_vmmkit_runs_the_guest_net_test_through_our_backend(workdir: Path, selftest_elf: Path,
                                                            vmmkit_hypervisor: str, transport: str) -> None:
    with NetNamespace() as ns, ns.responder(ns.add_tap("tap0")) as responder:
        daemon = NetDaemon(ns, workdir / "net.sock", "tap0")
        try:
            result = subprocess.run(
                [sys.executable, "-m", "vmmkit", "--hypervisor", vmmkit_hypervisor, "--kernel", str(selftest_elf),
                 "--memory", "size=128M,shared=on", "--cmdline", "test=net",
                 "--platform", f"virtio_transport={transport}",
                 "--net", f"vhost_user=on,socket={daemon.socket},mac={GUEST_MAC}"],
                capture_output=True, text=True, errors="replace", timeout=180, stdin=subprocess.DEVNULL)
        finally:
            log = daemon.stop()
    explain = f"--- stdout ---\n{result.stdout[-4000:]}--- stderr ---\n{result.stderr[-3000:]}--- daemon ---\n{log}"
    assert result.returncode == 0, explain
    _check(selftest_lines(result.stdout), responder, log, explain)
