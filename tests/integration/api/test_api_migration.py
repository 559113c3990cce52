"""Live migration between two real vmmkit processes (issue 16): ``vmmkit-remote
receive-migration`` on a VMM started without a VM, ``send-migration`` on the one running the
self-test guest; the guest's heartbeat and both CPUs go on at the destination, the source
exits; a destination that fails or is killed leaves the source running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import BANNER, VmmProcess, remote_command, wait_for


def heartbeat_numbers(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def receive_in_background(vmm: VmmProcess, url: str) -> subprocess.Popen[str]:
    """``vmmkit-remote receive-migration URL``: it answers once the migration is over."""
    return subprocess.Popen([*remote_command(), "--api-socket", str(vmm.socket), "receive-migration", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def send(vmm: VmmProcess, url: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*remote_command(), "--api-socket", str(vmm.socket), "send-migration", *extra, url],
                            capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, f"send-migration: {result.stderr}\n{vmm.log.read_text()[-3000:]}"
    return result


def spinning(start: Callable[..., VmmProcess], kernel: Path, **extra: Any) -> VmmProcess:
    source = start()
    source.create(source.guest_config(kernel, **extra))
    source.remote("boot")
    wait_for(lambda: len(heartbeat_numbers(source.output())) >= 2, 60, "two heartbeats")
    return source


class HoldAtMemory:
    """A Unix-socket relay between the two ends that forwards START and CONFIG, then the header
    of the first MEMORY request, and holds the rest: the migration stops mid-stream however fast
    the host is (a sleep raced a 256 MiB migration of a mostly zero guest, < 0.3 s on a quiet
    host). Held, it still reads (and drops) the source's bytes to see it go away; a side that
    closes closes the other, as a socket to a killed process would."""

    def __init__(self, listen_path: Path, target_path: Path) -> None:
        from vmmkit.migration import protocol

        self._protocol = protocol
        self.held = threading.Event()
        self._target_path = target_path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen_path))
        self._server.listen(1)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        source, _ = self._server.accept()
        target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target.connect(str(self._target_path))
        threading.Thread(target=self._answers, args=(target, source), daemon=True).start()
        try:
            self._requests(source, target)
        except OSError:
            pass
        finally:
            _close_both(source, target)

    def _requests(self, source: socket.socket, target: socket.socket) -> None:
        protocol = self._protocol
        while True:
            header = protocol.recv_exact(source, protocol.HEADER_SIZE, "a request header")
            target.sendall(header)
            command, length = protocol.unpack_request(header)
            if command is protocol.Command.MEMORY:
                self.held.set()
                while source.recv(1 << 16):  # until the source goes away
                    pass
                return
            target.sendall(protocol.recv_exact(source, length, "a payload"))

    @staticmethod
    def _answers(target: socket.socket, source: socket.socket) -> None:
        try:
            while data := target.recv(1 << 16):
                source.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(source, target)

    def close(self) -> None:
        self._server.close()


def _close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def destination(short_dir: Path, vmmkit_hypervisor: str) -> Any:
    started: list[VmmProcess] = []

    def start(hypervisor: str = vmmkit_hypervisor) -> VmmProcess:
        directory = short_dir / f"dst{len(started)}"
        directory.mkdir()
        vmm = VmmProcess(directory, hypervisor)
        started.append(vmm)
        return vmm

    yield start
    for vmm in started:
        vmm.stop()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_the_heartbeat_goes_on_at_the_destination(start_vmm: Any, destination: Any, selftest_elf: Path,
                                                  short_dir: Path, scheme: str) -> None:
    source = spinning(start_vmm, selftest_elf)
    target = destination()
    url = f"unix:{short_dir}/mig.sock" if scheme == "unix" else f"tcp:127.0.0.1:{_free_port()}"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    send(source, url)
    assert receiver.wait(60) == 0, receiver.stderr.read() if receiver.stderr else ""
    assert source.wait_exit(30) == 0  # the source's VMM exits, as Cloud Hypervisor's
    assert target.info()["state"] == "Running"
    serial = short_dir / "serial.log"  # the configuration travels: the destination writes there too
    before = heartbeat_numbers(serial.read_text(errors="replace"))
    beats = wait_for(lambda: len(heartbeat_numbers(serial.read_text(errors="replace"))) >= len(before) + 2
                     and heartbeat_numbers(serial.read_text(errors="replace")), 60, "heartbeats after migration")
    assert beats == list(range(1, len(beats) + 1)), f"a gap or a restart: {beats}"
    text = serial.read_text(errors="replace")
    assert text.count(BANNER) == 1 and "FAIL" not in text
    assert ("vm", "migrated") in source.events() and ("vm", "migration-received") in target.events()
    # both CPUs run at the destination: the guest's spin loop needs every CPU to go on, and the
    # heartbeat comes from the boot CPU
    target.remote("shutdown-vmm")
    assert target.wait_exit() == 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("when", ["stopped-before-start", "mid-migration"])
def test_kill_9_of_the_destination_leaves_the_source_running(start_vmm: Any, destination: Any, selftest_elf: Path,
                                                              short_dir: Path, when: str) -> None:
    source = spinning(start_vmm, selftest_elf, memory={"size": 256 << 20})
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    relay = None
    if when == "stopped-before-start":
        os.kill(target.proc.pid, signal.SIGSTOP)  # the source connects and waits for START's answer
    else:
        relay = HoldAtMemory(short_dir / "relay.sock", short_dir / "mig.sock")
        url = f"unix:{short_dir}/relay.sock"
    sender = subprocess.Popen([*remote_command(), "--api-socket", str(source.socket), "send-migration", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ("vm", "migrating") in source.events(), 20, "the migration to start")
    if relay is not None:
        assert relay.held.wait(30), "no MEMORY request came through the relay"
    else:
        time.sleep(0.3)
    os.kill(target.proc.pid, signal.SIGKILL)
    target.proc.wait(10)
    assert sender.wait(90) != 0, "the migration completed before the kill"
    error = sender.stderr.read()  # type: ignore[union-attr]
    assert "migration to unix:" in error and "failed" in error, error
    receiver.wait(10)
    assert source.proc.poll() is None and source.info()["state"] == "Running"
    count = len(heartbeat_numbers(source.output()))
    wait_for(lambda: len(heartbeat_numbers(source.output())) >= count + 1, 60, "a heartbeat after the failure")
    assert ("vm", "migrated") not in source.events()
    if relay is not None:
        relay.close()


def test_kill_9_of_the_source_leaves_the_destination_waiting_without_a_vm(
        start_vmm: Any, destination: Any, selftest_elf: Path, short_dir: Path) -> None:
    source = spinning(start_vmm, selftest_elf, memory={"size": 256 << 20})
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    relay = HoldAtMemory(short_dir / "relay.sock", short_dir / "mig.sock")
    sender = subprocess.Popen([*remote_command(), "--api-socket", str(source.socket), "send-migration",
                               f"unix:{short_dir}/relay.sock"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert relay.held.wait(30), "no MEMORY request came through the relay"
    os.kill(source.proc.pid, signal.SIGKILL)
    sender.wait(30)
    assert receiver.wait(60) != 0
    error = receiver.stderr.read()  # type: ignore[union-attr]
    assert "the migration from a sender on unix:" in error and "failed" in error, error
    assert target.proc.poll() is None  # the destination VMM stays, without a VM
    assert target.remote("info", check=False).returncode != 0
    assert ("vm", "migration-received") not in target.events()
    # and it can receive again: a second source migrates to it
    assert not (short_dir / "mig.sock").exists()
    relay.close()


def test_refusals_leave_the_source_running(start_vmm: Any, destination: Any, selftest_elf: Path,
                                           short_dir: Path) -> None:
    source = spinning(start_vmm, selftest_elf)
    bad = send(source, "http://example.com", check=False)
    assert bad.returncode == 2 and "unknown scheme 'http'" in bad.stderr  # refused by vmmkit-remote itself
    api = source.remote("send-migration", "unix:", check=False)
    assert api.returncode == 2 and "socket path is empty" in api.stderr
    nobody = send(source, f"unix:{short_dir}/nobody.sock", check=False)
    assert nobody.returncode != 0 and "cannot connect to unix:" in nobody.stderr, nobody.stderr
    private = send(source, f"unix:{short_dir}/nobody.sock", "--local", check=False)
    assert private.returncode != 0 and "local=true needs guest RAM in memfds (--memory shared=on)" in private.stderr
    target = destination()
    busy = target.remote("receive-migration", "tcp:127.0.0.1:notaport", check=False)
    assert busy.returncode == 2 and "is not a port" in busy.stderr
    assert source.info()["state"] == "Running"
    count = len(heartbeat_numbers(source.output()))
    wait_for(lambda: len(heartbeat_numbers(source.output())) >= count + 1, 60, "a heartbeat after the refusals")


def test_bad_bodies_are_400_with_the_reason(start_vmm: Any, selftest_elf: Path, short_dir: Path) -> None:
    from vmmkit.api.client import ApiClient, ApiError

    source = spinning(start_vmm, selftest_elf)
    client = ApiClient(str(source.socket))
    for body, reason in (({"destination_url": "ftp:x"}, "unknown scheme 'ftp'"),
                         ({"destination_url": "tcp:127.0.0.1"}, "tcp needs a host and a port"),
                         ({"destination_url": "tcp:127.0.0.1:0"}, "'0' is not a port"),
                         ({"destination_url": "unix:/x", "tls_dir": "/etc"}, "not supported (TLS)"),
                         ({"destination_url": "unix:/x", "memory_mode": "Postcopy"}, "post-copy"),
                         ({"destination_url": "unix:/x", "local": "yes"}, "true or false"),
                         ({"destination_url": "unix:/x", "bogus": 1}, "unknown keys")):
        with pytest.raises(ApiError) as caught:
            client.request("PUT", "vm.send-migration", body)
        assert caught.value.status == 400 and reason in " ".join(caught.value.messages), (body, caught.value.messages)
    with pytest.raises(ApiError) as caught:
        client.request("PUT", "vm.receive-migration", {"receiver_url": f"unix:{short_dir}/r.sock"})
    assert caught.value.status == 409  # this VMM has a VM
    assert source.info()["state"] == "Running"


def test_local_migration_hands_the_memfds_over(start_vmm: Any, destination: Any, selftest_elf: Path,
                                               short_dir: Path) -> None:
    source = spinning(start_vmm, selftest_elf, memory={"size": 64 << 20, "shared": True})
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    inode = _memfd_inodes(source.proc.pid)
    assert inode, "the source's RAM is not in a memfd"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    send(source, url, "--local")
    assert receiver.wait(60) == 0
    assert source.wait_exit(30) == 0
    assert _memfd_inodes(target.proc.pid) == inode  # the same memory, not a copy
    serial = short_dir / "serial.log"
    before = heartbeat_numbers(serial.read_text(errors="replace"))
    beats = wait_for(lambda: len(heartbeat_numbers(serial.read_text(errors="replace"))) >= len(before) + 2
                     and heartbeat_numbers(serial.read_text(errors="replace")), 60, "heartbeats after migration")
    assert beats == list(range(1, len(beats) + 1)), beats


def _memfd_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:vmmkit-ram"):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            pass
    return inodes


def test_a_guest_writing_to_virtio_blk_during_migration_leaves_a_whole_image(
        start_vmm: Any, destination: Any, selftest_elf: Path, short_dir: Path) -> None:
    from ..qemu_peer import SECTOR, blk_sector

    image = short_dir / "disk.img"
    image.write_bytes(bytes(2 << 20))
    source = start_vmm()
    source.create(source.guest_config(selftest_elf, cmdline="test=blkfill", disks=[{"path": str(image)}]))
    source.remote("boot")
    wait_for(lambda: "blkfill: 128/" in source.output(), 60, "the guest to be writing")
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    send(source, url)
    at_migration = source.output()
    assert receiver.wait(60) == 0
    assert "ok blkfill" not in at_migration, "the guest finished before the migration: make the disk larger"
    # the guest reads every sector back at the destination and checks it, then powers off
    assert target.wait_exit(120) == 0, source.output()[-2000:]
    assert "selftest: ok blkfill (4096 sectors written and read back" in source.output()  # the same serial file
    data = image.read_bytes()
    bad = [n for n in range(len(data) // SECTOR) if data[n * SECTOR:(n + 1) * SECTOR] != blk_sector(n)]
    assert not bad, f"{len(bad)} sectors do not hold the pattern, the first {bad[:5]}"
