"""The Machine's lifecycle on a real backend: pause parks every vCPU (the guest makes no
progress), resume continues, reboot boots the guest again, shutdown stops it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmmkit.config import VmConfig
from vmmkit.machine import MachineState, StopReason

GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

pytestmark = pytest.mark.requires_kvm


def wait_for(predicate, timeout: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def spinning_guest(make_machine, vmmkit_hypervisor: str, selftest_elf: Path, tmp_path: Path):  # noqa: ANN001
    serial = tmp_path / "serial.log"
    config = VmConfig.from_cli(kernel=str(selftest_elf), cmdline="test=spin", cpus="boot=2",
                               memory="size=64M", serial=f"file={serial}")
    machine = make_machine(config, hypervisor=vmmkit_hypervisor)
    machine.boot()
    yield machine, serial
    if machine.state is not MachineState.SHUTDOWN:
        machine.shutdown()


def heartbeats(serial: Path) -> int:
    return serial.read_text(errors="replace").count("selftest: heartbeat")


def test_pause_stops_the_guest_and_resume_continues_it(spinning_guest) -> None:  # noqa: ANN001
    machine, serial = spinning_guest
    assert wait_for(lambda: heartbeats(serial) >= 1), serial.read_text()
    machine.pause()
    assert machine.state is MachineState.PAUSED
    paused_at = heartbeats(serial)
    time.sleep(2.5)
    assert heartbeats(serial) == paused_at
    machine.resume()
    assert machine.state is MachineState.RUNNING
    assert wait_for(lambda: heartbeats(serial) > paused_at)


def test_reboot_boots_the_guest_again(spinning_guest) -> None:  # noqa: ANN001
    machine, serial = spinning_guest
    assert wait_for(lambda: heartbeats(serial) >= 1)
    machine.reboot()
    assert wait_for(lambda: serial.read_text().count("selftest: vmmkit x86_64 selftest v1") == 2)
    assert wait_for(lambda: serial.read_text().count("selftest: ok smp (2/2 cpus online)") == 2)
    assert machine.state is MachineState.RUNNING


def test_reboot_starts_a_guest_that_halted_with_interrupts_off(make_machine, vmmkit_hypervisor: str,  # noqa: ANN001
                                                                selftest_elf: Path, tmp_path: Path) -> None:
    """A hung guest (``cli; hlt``) leaves its vCPU HALTED: the reset must make it runnable at the
    new entry point (it stayed blocked, waiting for an interrupt nothing would send)."""
    serial = tmp_path / "serial.txt"
    config = VmConfig.from_cli(kernel=str(selftest_elf), cmdline="test=idle", cpus="boot=1",
                               serial=f"file={serial}", console="off")
    machine = make_machine(config, hypervisor=vmmkit_hypervisor)
    machine.boot()
    assert wait_for(lambda: "selftest: idle, halting" in serial.read_text()), serial.read_text()
    time.sleep(0.2)  # the vCPU is in HLT now
    machine.reboot()
    assert wait_for(lambda: serial.read_text().count("selftest: idle, halting") == 2), serial.read_text()


def test_shutdown_from_outside(spinning_guest) -> None:  # noqa: ANN001
    machine, serial = spinning_guest
    assert wait_for(lambda: heartbeats(serial) >= 1)
    exit_ = machine.shutdown()
    assert exit_.reason is StopReason.REQUESTED
    assert machine.state is MachineState.SHUTDOWN
    assert all(not thread.is_alive() for thread in machine._threads)


def test_vcpu_threads_are_named_for_orchestrators(spinning_guest) -> None:  # noqa: ANN001
    import os

    machine, _serial = spinning_guest

    def names() -> set[str]:
        out = set()
        for tid in os.listdir("/proc/self/task"):
            try:
                out.add(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
            except OSError:  # a thread that just ended
                pass
        return out

    assert wait_for(lambda: {"vcpu0", "vcpu1"} <= names(), timeout=5), names()
