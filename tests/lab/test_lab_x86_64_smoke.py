"""The x86-64 lab's smoke (issue 13, item 6: CI boots both labs): vmmkit's KVM backend on a
quirk-free ``/dev/kvm`` - Debian 12's amd64 kernel with ``kvm_amd`` in QEMU TCG ``-cpu max``
(AMD SVM with nested paging) - where ``--kvm-quirks auto`` must select no quirk set.

One lab boot (``--smp 1``: one emulated CPU, the setting under which the x86 lab never hung, see
lab/README.md "What is left"; the nested guests still get two vCPUs) runs the x86 self-test guest
with two vCPUs, whose stable lines must equal QEMU microvm's (TCG, on the host), and the x86 guest
suite's fastest subset through ``tests/tox_env.py`` (which fails if no test booted a guest): the
KVM exit and register tests of tiny guests (XSAVE-less KVM: the XCR round trip), irqfd and MSI
delivery, the quirk sets a machine gets, and the PIT through the I/O APIC (vmmkit's with two
vCPUs, and KVM's own, which only a quirk-free KVM may use). The whole KVM suite
there is ``tox -e py311-kvm-x86_64-lab``. The first run builds the lab's cache (~100 MB of
Debian packages; 45 s from an empty cache on this host).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from integration.guest_output import run_qemu_microvm, selftest_lines, stable_lines

from .conftest import run_in_lab
from .test_lab_aarch64 import MARK, _sections

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ELF = "tests/guests/build/x86_64/selftest.elf"

#: The x86 guest suite's fastest subset: in-process tests of tiny guests (~0.1-2 s each in the lab)
#: and two ``vmmkit`` runs (~10-15 s each there: Python's start-up on an emulated CPU).
SUBSET = (
    "tests/integration/kvm/test_kvm_exits.py",
    "tests/integration/kvm/test_kvm_irq.py",
    "tests/integration/kvm/test_kvm_host_quirks.py::test_a_machine_gets_a_userspace_pit_exactly_under_pvm",
    "tests/integration/test_boot_x86_64.py::test_pit_ticks_arrive_on_the_ioapic_pin_the_madt_names[2]",
    "tests/integration/test_boot_x86_64.py::test_kvms_own_pit_ticks_on_the_same_pin",
)

SCRIPT = f"""
section() {{ echo "{MARK} $1"; shift; "$@" 2>&1; echo "{MARK} status $?"; }}
section npt cat /sys/module/kvm_amd/parameters/npt
section quirks python3 -c "from vmmkit_kvm import quirks; print('auto selects', quirks.select('auto').name)"
section plugins vmmkit plugins
section selftest-2 vmmkit -v --kvm-quirks auto --hypervisor kvm --kernel {ELF} --cmdline hello --cpus boot=2
section suite env VMMKIT_TEST_HYPERVISOR=kvm VMMKIT_TEST_ARCH=x86_64 \\
    python3 tests/tox_env.py -q -p no:cacheprovider --durations=10 {shlex.join(SUBSET)}
"""


@pytest.fixture(scope="module")
def lab(x86_64_lab: object) -> dict[str, tuple[str, int]]:
    if not (ROOT / ELF).exists():
        pytest.skip(f"{ELF} is not built (make -C tests/guests)")
    result = run_in_lab("--arch", "x86_64", "--smp", "1", "--timeout", "600", "--", "sh", "-c", SCRIPT)
    sections = _sections(result.stdout)
    assert set(sections) == {"npt", "quirks", "plugins", "selftest-2", "suite"}, result.stdout + result.stderr
    return sections


def test_the_labs_kvm_is_svm_with_nested_paging(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["npt"]
    assert status == 0 and output.strip() in ("Y", "1"), output


def test_kvm_quirks_auto_selects_none_and_plugins_names_no_quirk_set(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["quirks"]
    assert status == 0 and output.strip() == "auto selects none", output
    output, status = lab["plugins"]
    assert status == 0, output
    kvm = [line for line in output.splitlines() if line.strip().startswith("kvm ")]
    assert len(kvm) == 1 and "not usable" not in kvm[0] and "x86_64" in kvm[0], output
    assert "host quirks" not in kvm[0], kvm[0]


def test_the_selftest_guest_with_two_vcpus_prints_what_qemu_microvm_prints(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["selftest-2"]
    assert status == 0, output
    lines = selftest_lines(output)
    assert "selftest: ok smp (2/2 cpus online)" in lines and lines[-1] == "selftest: exit 0", output
    assert "kvm.quirks" not in output, output  # -v logs the quirk set a VM gets (none here)
    qemu = run_qemu_microvm(ROOT / ELF, "hello", 2, accel="tcg")
    assert qemu.returncode == 0, qemu.stdout + qemu.stderr
    assert stable_lines(qemu.stdout), "QEMU printed no selftest lines"
    assert stable_lines(output) == stable_lines(qemu.stdout)


def test_the_x86_guest_suites_fastest_subset_passes_on_the_quirk_free_kvm(lab: dict[str, tuple[str, int]]) -> None:
    output, status = lab["suite"]
    assert status == 0, output
    assert " failed" not in output and " error" not in output, output
    booted = [line for line in output.splitlines() if line.startswith("kvm/x86_64: ")]
    assert booted and not booted[0].startswith("kvm/x86_64: 0 "), output
