"""Live migration between two VMMs in one process (issue 16), where the test can see both
ends' memory: writes the VMM makes itself (device DMA, which no backend dirty log sees) reach
the destination; a sender that goes away or sends garbage leaves the receiver without a VM."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmkit.config import VmConfig
from vmmkit.migration import protocol
from vmmkit.migration.protocol import Command, MigrationError
from vmmkit.vmm import Vmm

pytestmark = pytest.mark.requires_kvm

#: A page of guest RAM the self-test guest never touches (it lives in the first few MiB).
HOST_WRITTEN_PAGE = 60 << 20


def heartbeats(serial: Path) -> list[int]:
    return [int(line.split()[-1]) for line in serial.read_text(errors="replace").splitlines()
            if line.startswith("selftest: heartbeat ") and line.split()[-1].isdigit()]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {predicate}")


@pytest.fixture
def make_vmm(vmmkit_pm: Any, vmmkit_registries: Any) -> Iterator[Callable[[str], Vmm]]:
    made: list[Vmm] = []

    def make(hypervisor: str) -> Vmm:
        vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm, hypervisor=hypervisor, seccomp="false")
        made.append(vmm)
        return vmm

    yield make
    for vmm in made:
        vmm.close()


def spinning(make_vmm: Callable[[str], Vmm], kernel: Path, serial: Path, hypervisor: str = "kvm") -> Vmm:
    vmm = make_vmm(hypervisor)
    vmm.create(VmConfig.from_json({
        "payload": {"kernel": str(kernel), "cmdline": "test=spin"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 64 << 20}, "serial": {"mode": "File", "file": str(serial)}, "console": {"mode": "Off"}}))
    vmm.boot()
    wait_for(lambda: len(heartbeats(serial)) >= 1)
    return vmm


def receiving(vmm: Vmm, url: str, path: Path) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            vmm.receive_migration(url)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(path.exists, 20)
    return thread, errors


def test_writes_the_vmm_makes_itself_reach_the_destination(make_vmm: Callable[[str], Vmm], selftest_elf: Path,
                                                           tmp_path: Path) -> None:
    """A host thread writes guest RAM (as a device's DMA does) until the VM pauses: KVM's dirty
    log never sees these writes, the content digests of the stop-and-copy must."""
    source = spinning(make_vmm, selftest_elf, tmp_path / "serial.log")
    machine = source.machine
    assert machine is not None and machine.memory is not None
    memory = machine.memory
    stop = threading.Event()
    written = [0]

    def write() -> None:
        while not stop.is_set():
            written[0] += 1
            memory.write(HOST_WRITTEN_PAGE, struct.pack("<Q", written[0]) * 512)
            time.sleep(0.001)

    writer = threading.Thread(target=write, daemon=True)

    def quiesce(event: str, _properties: dict[str, Any]) -> None:
        if event == "vm-pausing":  # what a device does when the VM pauses
            stop.set()
            writer.join()

    machine.listeners.append(quiesce)
    writer.start()
    target = make_vmm("kvm")
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    time.sleep(0.1)
    source.send_migration(f"unix:{path}")()
    thread.join(60)
    assert not errors, errors
    assert stop.is_set() and written[0] > 10
    received = target.machine.memory.read(HOST_WRITTEN_PAGE, 4096)  # type: ignore[union-attr]
    assert received == struct.pack("<Q", written[0]) * 512, \
        f"the destination holds write {struct.unpack_from('<Q', received)[0]}, the last was {written[0]}"
    assert target.state == "Running" and source.done


def test_kvm_to_emu(make_vmm: Callable[[str], Vmm], selftest_elf: Path, tmp_path: Path) -> None:
    """The state crosses backends: the guest goes on under the unicorn backend."""
    serial = tmp_path / "serial.log"
    source = spinning(make_vmm, selftest_elf, serial)
    target = make_vmm("emu")
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    source.send_migration(f"unix:{path}")()
    thread.join(60)
    assert not errors, errors
    assert target.machine is not None and target.machine.hypervisor is not None
    assert target.machine.hypervisor.name == "emu"
    before = heartbeats(serial)
    beats = wait_for(lambda: len(heartbeats(serial)) >= len(before) + 2 and heartbeats(serial), 120)
    assert beats == list(range(1, len(beats) + 1)), beats


# -- a hostile or failing sender -------------------------------------------------------------------


def _sender(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(path))
    return sock


def _refused(sock: socket.socket, command: Command, payload: bytes = b"") -> str:
    protocol.send_request(sock, command, payload)
    with pytest.raises(MigrationError) as caught:
        protocol.read_response(sock, command.name)
    return str(caught.value)


@pytest.mark.parametrize("attack", ["garbage", "memory-first", "other-version", "outside-ram", "state-early",
                                    "eof-mid-memory", "abandon"])
def test_the_receiver_never_starts_a_half_received_vm(make_vmm: Callable[[str], Vmm], selftest_elf: Path,
                                                     tmp_path: Path, attack: str) -> None:
    config = VmConfig.from_json({"payload": {"kernel": str(selftest_elf)}, "memory": {"size": 64 << 20},
                                 "serial": {"mode": "Null"}, "console": {"mode": "Off"}}).assign_ids()
    target = make_vmm("kvm")
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    sock = _sender(path)
    start = protocol.start_payload("test", local=False)
    cfg = protocol.encode_json({"config": config.to_json(), "arch": "x86_64", "hypervisor": "kvm",
                                "memory": [{"slot": 0, "start": 0, "size": 64 << 20}]})
    with sock:
        if attack == "garbage":
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        elif attack == "memory-first":
            assert "MEMORY before START" in _refused(sock, Command.MEMORY, protocol.pack_ranges([(0, 4096)]))
        elif attack == "other-version":
            assert "protocol version 99" in _refused(sock, Command.START, protocol.encode_json(
                {"protocol": protocol.PROTOCOL, "version": 99, "vmmkit": "9", "local": False}))
        else:
            protocol.call(sock, Command.START, start)
            protocol.call(sock, Command.CONFIG, cfg)
            if attack == "outside-ram":
                assert "not inside the guest RAM" in _refused(sock, Command.MEMORY,
                                                              protocol.pack_ranges([((64 << 20) - 4096, 8192)]))
            elif attack == "state-early":
                assert "STATE before CONFIG" not in _refused(sock, Command.STATE, protocol.encode_json({"vcpus": []}))
            elif attack == "eof-mid-memory":
                protocol.send_request(sock, Command.MEMORY, protocol.pack_ranges([(0, 1 << 20)]))
                sock.sendall(bytes(4096))
            elif attack == "abandon":
                assert "abandoned" in _refused(sock, Command.ABANDON)
    thread.join(30)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], MigrationError), errors
    assert target.state is None and target.machine is None  # no VM: the VMM is as it was
    assert not path.exists()
