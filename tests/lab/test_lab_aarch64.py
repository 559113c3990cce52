"""The AArch64 lab (``lab/``): vmmkit's KVM backend on a real arm64 ``/dev/kvm`` (Debian 12's
arm64 kernel in QEMU TCG with the virtualization extensions) boots the AArch64 self-test guest
and prints the lines QEMU's ``virt`` machine prints for the same Image.

One lab boot serves every test of the module (TCG is slow; the boot takes a few seconds, the
guests inside a few seconds each). The first run builds the lab's cache (Debian packages from
the archive, ~100 MB); a host that cannot build or boot it skips, saying why.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from integration.guest_output import selftest_lines, stable_lines

from .conftest import run_in_lab

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "tests/guests/build/aarch64/selftest.Image"
MARK = "=== lab:"

#: Run inside the lab (busybox sh in /src): each section starts with a MARK line and ends with
#: the command's status.
SCRIPT = f"""
section() {{ echo "{MARK} $1"; shift; "$@" 2>&1; echo "{MARK} status $?"; }}
section plugins vmmkit plugins
section kvm-1 vmmkit --hypervisor kvm --kernel {IMAGE} --cmdline hello --cpus boot=1
section kvm-2 vmmkit --hypervisor kvm --kernel {IMAGE} --cmdline hello --cpus boot=2
section kvm-fault vmmkit --hypervisor kvm --kernel {IMAGE} --cmdline test=fault
section kvm-irq-1 vmmkit --hypervisor kvm --kernel {IMAGE} --cmdline test=irq --cpus boot=1
section kvm-irq-2 vmmkit --hypervisor kvm --kernel {IMAGE} --cmdline test=irq --cpus boot=2
"""


def _sections(output: str) -> dict[str, tuple[str, int]]:
    sections: dict[str, tuple[str, int]] = {}
    name, lines = None, []
    for line in output.splitlines():
        if line.startswith(MARK):
            word = line[len(MARK):].split()
            if word[0] == "status" and name is not None:
                sections[name] = ("\n".join(lines), int(word[1]))
                name, lines = None, []
            else:
                name, lines = word[0], []
        elif name is not None:
            lines.append(line)
    return sections


@pytest.fixture(scope="module")
def lab(aarch64_lab: object) -> dict[str, tuple[str, int]]:
    if not (ROOT / IMAGE).exists():
        pytest.skip(f"{IMAGE} is not built (make -C tests/guests)")
    result = run_in_lab("--timeout", "600", "--", "sh", "-c", SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    sections = _sections(result.stdout)
    assert set(sections) == {"plugins", "kvm-1", "kvm-2", "kvm-fault", "kvm-irq-1", "kvm-irq-2"}, \
        result.stdout + result.stderr
    return sections


def run_qemu_virt(cmdline: str, cpus: int, machine: str = "virt") -> subprocess.CompletedProcess[str]:
    """The peer: QEMU's ``virt`` machine (TCG) on the host booting the same Image."""
    return subprocess.run(
        ["qemu-system-aarch64", "-M", machine, "-cpu", "cortex-a72", "-m", "256M", "-smp", str(cpus), "-nodefaults",
         "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", str(ROOT / IMAGE), "-append", cmdline],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def test_vmmkit_plugins_lists_kvm_usable_for_aarch64(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["plugins"]
    assert status == 0, output
    kvm = [line for line in output.splitlines() if re.match(r"\s+kvm\s", line)]
    assert len(kvm) == 1, output
    assert "not usable" not in kvm[0] and "aarch64" in kvm[0], kvm[0]


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_selftest_guest_on_kvm_arm64_prints_what_qemu_virt_prints(lab: dict[str, tuple[str, int]],
                                                                      cpus: int) -> None:
    output, status = lab[f"kvm-{cpus}"]
    assert status == 0, output
    lines = selftest_lines(output)
    assert lines[-1] == "selftest: exit 0", output
    assert f"selftest: ok smp ({cpus}/{cpus} cpus online)" in lines
    assert any("gicv3" in line for line in lines if line.startswith("selftest: info fdt:")), lines
    qemu = run_qemu_virt("hello", cpus)
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
    assert stable_lines(qemu.stdout), "QEMU printed no selftest lines"
    assert stable_lines(output) == stable_lines(qemu.stdout)


def test_a_guest_exception_fails_the_run_on_kvm_arm64(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["kvm-fault"]
    lines = selftest_lines(output)
    assert any(line.startswith("selftest: FAIL exception: sync: undefined instruction") for line in lines), output
    assert lines[-1] == "selftest: exit 1"
    assert status == 1  # the guest's status, through debug-exit and PSCI SYSTEM_OFF served by KVM


@pytest.mark.parametrize("cpus", [1, 2])
def test_interrupts_reach_the_guest_through_kvms_gicv3_as_on_qemu_virt(lab: dict[str, tuple[str, int]],
                                                                       cpus: int) -> None:
    """test=irq: an SGI to self, the virtual timer's PPI, the PL031's SPI (a vmmkit device's
    level line into the in-kernel GICv3). QEMU virt with a GICv3 is the peer."""
    output, status = lab[f"kvm-irq-{cpus}"]
    lines = selftest_lines(output)
    assert status == 0, output
    for check in ("gic sgi", "timer", "gic spi"):
        assert any(line.startswith(f"selftest: ok {check} (") for line in lines), output
    qemu = run_qemu_virt("test=irq", cpus, machine="virt,gic-version=3")
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
    assert stable_lines(output) == stable_lines(qemu.stdout)
