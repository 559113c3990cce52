"""Pause, resume and stop on emu: kicks take every vCPU out of the emulator promptly."""

from __future__ import annotations

import time
from pathlib import Path

from vmmkit.config import VmConfig

GUEST_ARCH = "aarch64"


def heartbeats(log: Path) -> int:
    return log.read_text(errors="replace").count("selftest: heartbeat") if log.exists() else 0


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_pause_resume_and_shutdown_of_a_spinning_guest(selftest_image: Path, vmmkit_hypervisor: str,
                                                       make_machine, tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    config = VmConfig.from_cli(kernel=str(selftest_image), cmdline="test=spin", cpus="boot=2",
                               serial=f"file={log}")
    machine = make_machine(config, hypervisor=vmmkit_hypervisor, arch="aarch64")
    machine.boot()
    wait_for(lambda: heartbeats(log) >= 1)
    started = time.monotonic()
    machine.pause()
    assert time.monotonic() - started < 2.0
    frozen = heartbeats(log)
    time.sleep(1.5)
    assert heartbeats(log) == frozen
    machine.resume()
    wait_for(lambda: heartbeats(log) > frozen)
    exit_ = machine.shutdown()
    assert exit_.reason.value == "requested"
