"""Boot the project's x86-64 test guest on vmmkit, as a user would, and cross-check it
against QEMU's microvm running the very same ELF."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmmkit.testing import run_vmmkit

from .guest_output import PIT_PEER_MACHINE, run_qemu_microvm, run_qemu_x86, selftest_lines, stable_lines

GUEST_ARCH = "x86_64"  # what vmmkit_hypervisor resolves for (see vmmkit.testing)

pytestmark = pytest.mark.requires_kvm

GUESTS = Path(__file__).resolve().parents[1] / "guests" / "build" / "x86_64"


@pytest.fixture(scope="module")
def selftest_bzimage(selftest_elf: Path) -> Path:
    path = selftest_elf.parent / "selftest.bzImage"
    if not path.is_file():
        pytest.skip(f"{path} is not built (make -C tests/guests)")
    return path


def boot(kernel: Path, *args: str, hypervisor: str = "auto", timeout: float = 60):
    return run_vmmkit("--hypervisor", hypervisor, "--kernel", str(kernel), *args, timeout=timeout)


@pytest.mark.parametrize("image", ["elf", "bzimage"])
def test_the_guest_sees_its_command_line_and_both_cpus(
    image: str, selftest_elf: Path, selftest_bzimage: Path, vmmkit_hypervisor: str
) -> None:
    kernel = selftest_elf if image == "elf" else selftest_bzimage
    result = boot(kernel, "--cmdline", "hello", "--cpus", "boot=2", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: cmdline: hello" in lines
    assert "selftest: cpus: 2" in lines
    assert "selftest: ok smp (2/2 cpus online)" in lines
    assert "selftest: exit 0" in lines
    assert not [line for line in lines if "FAIL" in line]


def test_four_cpus_are_found_and_started(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    result = boot(selftest_elf, "--cpus", "boot=4", hypervisor=vmmkit_hypervisor)
    lines = selftest_lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: cpus: 4" in lines
    assert "selftest: ok smp (4/4 cpus online)" in lines


def test_a_failing_guest_check_becomes_the_exit_status(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    result = boot(selftest_elf, "--cmdline", "test=no-such-test", hypervisor=vmmkit_hypervisor)
    assert "selftest: FAIL" in result.stdout
    assert result.returncode not in (0, 2)


@pytest.mark.requires_qemu
@pytest.mark.parametrize("cpus", [1, 2])
def test_qemu_microvm_prints_the_same_lines(selftest_elf: Path, vmmkit_hypervisor: str, cpus: int) -> None:
    ours = boot(selftest_elf, "--cmdline", "hello", "--cpus", f"boot={cpus}", hypervisor=vmmkit_hypervisor)
    qemu = run_qemu_microvm(selftest_elf, "hello", cpus, accel="kvm")
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
    assert stable_lines(qemu.stdout), "QEMU printed no selftest lines"
    assert stable_lines(ours.stdout) == stable_lines(qemu.stdout)


PIT_OK = "selftest: ok pit (3 ticks of IRQ 0 through the I/O APIC)"


@pytest.mark.requires_interrupts
@pytest.mark.parametrize("cpus", [1, 2])
def test_pit_ticks_arrive_on_the_ioapic_pin_the_madt_names(selftest_elf: Path, vmmkit_hypervisor: str,
                                                            cpus: int) -> None:
    """The MADT says ISA IRQ 0 is GSI 2 (IOAPIC pin 2); the backend must wire the PIT there. On
    a host whose quirks replace KVM's PIT the ticks come from the userspace i8254."""
    _check_pit(boot(selftest_elf, "--cmdline", "test=pit", "--cpus", f"boot={cpus}", hypervisor=vmmkit_hypervisor))


def test_kvms_own_pit_ticks_on_the_same_pin(selftest_elf: Path, vmmkit_hypervisor: str) -> None:
    """``--kvm-quirks none`` keeps KVM's in-kernel PIT even on a host whose quirks would replace
    it (three ticks at 100 Hz are affordable there)."""
    if vmmkit_hypervisor != "kvm":
        pytest.skip(f"KVM's in-kernel PIT: the backend is {vmmkit_hypervisor}")
    _check_pit(boot(selftest_elf, "--kvm-quirks", "none", "--cmdline", "test=pit", hypervisor=vmmkit_hypervisor))


def _check_pit(result: subprocess.CompletedProcess[str]) -> None:
    lines = selftest_lines(result.stdout)
    assert PIT_OK in lines, result.stdout + result.stderr
    assert any(line.startswith("selftest: info pit: irq 0 -> gsi 2 (madt override)") for line in lines)
    assert result.returncode == 0 and lines[-1] == "selftest: exit 0"


@pytest.mark.requires_qemu
@pytest.mark.requires_interrupts
@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_qemu_pc_prints_the_same_pit_lines(selftest_elf: Path, vmmkit_hypervisor: str, accel: str) -> None:
    ours = boot(selftest_elf, "--cmdline", "test=pit", "--cpus", "boot=2", hypervisor=vmmkit_hypervisor)
    qemu = run_qemu_x86(selftest_elf, "test=pit", 2, machine=PIT_PEER_MACHINE, accel=accel)
    assert PIT_OK in stable_lines(qemu.stdout), qemu.stdout + qemu.stderr
    assert stable_lines(ours.stdout) == stable_lines(qemu.stdout)


@pytest.mark.parametrize("content", [b"", b"\x7fELF\x02\x01\x01" + b"\0" * 9, os.urandom(8192)],
                         ids=["empty", "truncated-elf", "random"])
def test_a_bad_kernel_image_is_refused_naming_the_file(tmp_path: Path, content: bytes) -> None:
    kernel = tmp_path / "kernel.bin"
    kernel.write_bytes(content)
    result = boot(kernel)
    assert result.returncode == 1
    assert str(kernel) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_truncated_copy_of_the_real_guest_is_refused(tmp_path: Path, selftest_elf: Path) -> None:
    kernel = tmp_path / "selftest-truncated.elf"
    kernel.write_bytes(selftest_elf.read_bytes()[:3000])
    result = boot(kernel)
    assert result.returncode == 1
    assert str(kernel) in result.stderr


def test_vmmkit_run_boots_the_demo_guest(vmmkit_hypervisor: str) -> None:
    result = run_vmmkit("run", "--hypervisor", vmmkit_hypervisor, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: exit 0" in result.stdout


@pytest.mark.requires_interrupts
def test_a_guest_panic_reaches_the_event_monitor_through_pvpanic(selftest_elf: Path, tmp_path: Path,
                                                                  vmmkit_hypervisor: str) -> None:
    from vmmkit.events import read_events

    events_file = tmp_path / "events.json"
    result = boot(selftest_elf, "--cmdline", "test=fault", "--pvpanic", "--event-monitor", f"path={events_file}",
                  hypervisor=vmmkit_hypervisor)
    assert "selftest: FAIL exception: #UD" in result.stdout
    panics = [e for e in read_events(events_file.read_text()) if (e["source"], e["event"]) == ("guest", "panic")]
    assert [e["properties"] for e in panics] == [{"kind": "panicked"}]


@pytest.mark.requires_qemu
def test_qemu_sees_the_same_panic_notification(selftest_elf: Path) -> None:
    """The guest's pvpanic write is the real protocol: QEMU's pvpanic device stops the VM on it."""
    result = subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm,rtc=on", "-accel", "kvm", "-m", "128M", "-nodefaults",
         "-no-user-config", "-nographic", "-serial", "stdio", "-device", "pvpanic", "-action", "panic=exit-failure",
         "-kernel", str(selftest_elf), "-append", "test=fault"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "selftest: FAIL exception: #UD" in result.stdout
    assert result.returncode == 1 and "selftest: exit" not in result.stdout
