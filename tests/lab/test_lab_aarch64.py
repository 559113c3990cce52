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
section kvm-nisv vmmkit --hypervisor kvm --kernel /lab/files/nisv.Image
section runloop python3 -m pytest -q -p no:cacheprovider tests/lab/test_kvm_arm64_runloop.py
"""

#: A hostile arm64 Image: a store pair to the PL011 (no instruction syndrome: KVM cannot emulate it).
NISV_GUEST = r"""
    b code
    .word 0
    .quad 0x80000, 0x10000, 2, 0, 0, 0   // text_offset, image_size, flags (LE, 4K), reserved
    .ascii "ARM\x64"
    .word 0
code:
    movz x1, #0x0900, lsl #16
    stp x0, x0, [x1]
1:  b 1b
"""


def assemble_nisv_guest(work: Path) -> Path:
    (work / "g.S").write_text(f".text\n.globl _start\n_start:\n{NISV_GUEST}")
    for step in (["aarch64-linux-gnu-as", "-o", "g.o", "g.S"],
                 ["aarch64-linux-gnu-ld", "-Ttext=0x40080000", "-o", "g.elf", "g.o"],
                 ["aarch64-linux-gnu-objcopy", "-O", "binary", "g.elf", "nisv.Image"]):
        subprocess.run(step, cwd=work, check=True, capture_output=True)
    return work / "nisv.Image"


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
def lab(aarch64_lab: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int]]:
    if not (ROOT / IMAGE).exists():
        pytest.skip(f"{IMAGE} is not built (make -C tests/guests)")
    nisv = assemble_nisv_guest(tmp_path_factory.mktemp("nisv"))
    result = run_in_lab("--add", str(nisv), "--timeout", "600", "--", "sh", "-c", SCRIPT)
    assert result.returncode == 0, result.stdout + result.stderr
    sections = _sections(result.stdout)
    assert set(sections) == {"plugins", "kvm-1", "kvm-2", "kvm-fault", "kvm-irq-1", "kvm-irq-2", "kvm-nisv",
                             "runloop"}, \
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


def test_an_mmio_access_kvm_cannot_decode_stops_the_vm_with_a_clear_error(lab: dict[str, tuple[str, int]]) -> None:
    """A store pair to MMIO has no instruction syndrome: with KVM_CAP_ARM_NISV_TO_USER the backend
    names the address and the reason (not ENOSYS from KVM_RUN, not a traceback)."""
    output, status = lab["kvm-nisv"]
    assert status == 1, output
    assert "guest access at 0x9000000 that KVM cannot emulate: no instruction syndrome" in output, output
    assert "Traceback" not in output


def test_the_native_run_loop_serves_mmio_kicks_and_counts_on_kvm_arm64(lab: dict[str, tuple[str, int]]) -> None:
    """``test_kvm_arm64_runloop.py`` ran inside the lab (the C loop built from arm64's headers)."""
    output, status = lab["runloop"]
    assert status == 0, output
    assert "5 passed" in output, output
    assert "skipped" not in output, output
