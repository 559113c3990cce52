"""The x86-64 test guest booted by ``vmmkit --hypervisor mshv`` on the simulated /dev/mshv
(a CONTRACT TEST of the backend, not a run on the Microsoft Hypervisor), compared line by line
with the same guest on KVM; and what this host says without the simulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmkit.testing import HYPERVISOR_ENV, kvm_unusable_reason, run_vmmkit

from ..guest_output import selftest_lines, stable_lines

GUEST_ARCH = "x86_64"
SIMULATED = {"VMMKIT_MSHV_KERNEL": "simulated"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VMMKIT_MSHV_KERNEL"}
    env.update(extra)
    return env


def test_without_the_simulator_mshv_says_dev_mshv_is_missing(guest_elf: Path) -> None:
    result = run_vmmkit("--hypervisor", "mshv", "--kernel", str(guest_elf), env=_env())
    assert result.returncode != 0
    assert "/dev/mshv not found" in result.stderr


def test_vmmkit_plugins_says_what_mshv_was_verified_against() -> None:
    result = run_vmmkit("plugins", env=_env())
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("mshv ")]
    assert "not usable: /dev/mshv not found; verified against a simulated kernel" in line


def test_auto_never_picks_the_simulated_kernel(vmmkit_registries: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmmkit_mshv.hypervisor import MshvHypervisor

    monkeypatch.setenv("VMMKIT_MSHV_KERNEL", "simulated")
    availability = MshvHypervisor.is_available()
    assert availability and not availability.auto
    assert vmmkit_registries.select_hypervisor("auto", "x86_64").name != "mshv"  # type: ignore[attr-defined]


@pytest.fixture
def on_mshv(request: pytest.FixtureRequest) -> None:
    wanted = os.environ.get(HYPERVISOR_ENV, "auto")
    if wanted not in ("auto", "mshv"):
        pytest.skip(f"the tox environment targets the {wanted} backend; these are the mshv backend's tests")
    pytest.importorskip("vmmkit_emu", reason="the simulated /dev/mshv runs on the vmmkit-emu plugin's engine")
    request.node._vmmkit_backend = "mshv/x86_64"


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_guest_prints_the_same_lines_as_on_kvm(guest_elf: Path, on_mshv: None, cpus: int) -> None:
    args = ("--kernel", str(guest_elf), "--cmdline", "hello", "--cpus", f"boot={cpus}")
    mshv = run_vmmkit("--hypervisor", "mshv", *args, env=_env(**SIMULATED), timeout=120)
    assert mshv.returncode == 0, mshv.stdout + mshv.stderr
    lines = selftest_lines(mshv.stdout)
    assert f"selftest: ok smp ({cpus}/{cpus} cpus online)" in lines and "selftest: exit 0" in lines
    if kvm_unusable_reason():
        pytest.skip(f"no KVM to compare with: {kvm_unusable_reason()}")
    kvm = run_vmmkit("--hypervisor", "kvm", *args, env=_env(), timeout=120)
    assert kvm.returncode == 0, kvm.stdout + kvm.stderr
    assert stable_lines(mshv.stdout) == stable_lines(kvm.stdout)
