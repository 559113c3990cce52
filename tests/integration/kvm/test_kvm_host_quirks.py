"""The KVM host quirks on the real /dev/kvm: what ``--kvm-quirks`` changes in a VM, and that
the project's test guest boots under every setting. (The Linux boots in tests/linux are what
the ``pvm`` set exists for.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmkit_kvm import quirks

from vmmkit.config import VmConfig
from vmmkit.testing import run_vmmkit

pytestmark = pytest.mark.requires_kvm

ON_PVM = quirks.detect() == "pvm"


def test_plugins_lists_the_hosts_quirks() -> None:
    result = run_vmmkit("plugins")
    assert result.returncode == 0, result.stderr
    kvm_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("kvm "))
    if ON_PVM:
        assert "host quirks: pvm (detected: /sys/module/kvm_pvm)" in kvm_line
    else:
        assert "host quirks" not in kvm_line


@pytest.mark.parametrize("mode", ["pvm", "none"])
def test_a_machine_gets_a_userspace_pit_exactly_under_pvm(
    mode: str, make_machine, selftest_elf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(quirks.ENV_MODE, mode)
    config = VmConfig.from_cli(kernel=str(selftest_elf), cmdline="hello")
    machine = make_machine(config, hypervisor="kvm")
    machine.build()
    pits = [placed for placed in machine.devices if placed.kind == "i8254"]
    assert machine.vm.quirks.name == mode
    assert machine.vm.in_kernel_pit is (mode == "none")
    if mode == "pvm":
        assert [(p.pio, p.irq) for p in pits] == [((0x40, 4), 0)]
        assert pits[0].device.dilation == quirks.DEFAULT_DILATION
    else:
        assert pits == []
    machine.close()


@pytest.mark.parametrize("mode", ["auto", "pvm", "none"])
def test_the_test_guest_boots_under_every_setting(mode: str, selftest_elf: Path) -> None:
    result = run_vmmkit("--kvm-quirks", mode, "--kernel", str(selftest_elf), "--cmdline", "hello",
                        "--cpus", "boot=2", "--hypervisor", "kvm", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest: cmdline: hello" in result.stdout  # not a Linux kernel: no quirk arguments
    assert "kvm.quirks.cmdline" not in result.stderr


def test_bad_options_are_usage_errors(selftest_elf: Path) -> None:
    for args in (["--kvm-quirks", "vmx"], ["--kvm-clock-dilation", "0"]):
        result = run_vmmkit(*args, "--kernel", str(selftest_elf))
        assert result.returncode == 2, result.stderr
        assert "--kvm-" in result.stderr
