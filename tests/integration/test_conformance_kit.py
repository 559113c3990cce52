"""The backend conformance kit (:mod:`vmmkit.testing.conformance`) run as its users run it, one
pytest line per backend: KVM (real /dev/kvm), MSHV (on the simulated /dev/mshv: a contract
test) and emu pass it; a deliberately broken backend fails it, naming the contract it broke."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmmkit.testing import kvm_unusable_reason

KIT = "vmmkit.testing.conformance"
BROKEN = Path(__file__).with_name("broken_backend.py")


def run_kit(backend: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("VMMKIT_TEST_HYPERVISOR", "VMMKIT_MSHV_KERNEL")}
    environ.update(env, VMMKIT_CONFORMANCE_BACKEND=backend)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BROKEN.parent), environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "--pyargs", KIT, "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300, env=environ, cwd=BROKEN.parent)


def test_kvm_passes_the_kit() -> None:
    if kvm_unusable_reason():
        pytest.skip(f"no KVM here: {kvm_unusable_reason()}")
    result = run_kit("kvm")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed" in result.stdout, result.stdout


def test_mshv_on_the_simulated_kernel_passes_the_kit() -> None:
    pytest.importorskip("vmmkit_emu", reason="the simulated /dev/mshv runs on the vmmkit-emu plugin's engine")
    result = run_kit("mshv", VMMKIT_MSHV_KERNEL="simulated")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 passed" in result.stdout, result.stdout


def test_emu_passes_the_kit_skipping_what_it_does_not_offer() -> None:
    pytest.importorskip("unicorn", reason="the emu backend needs unicorn")
    result = run_kit("emu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed, 1 skipped" in result.stdout, result.stdout  # no irqfd (dirty logging: write hooks)


@pytest.mark.parametrize(
    "flaw,contract,selected",
    [("lose_kicks", "kick", "kick_stops"), ("truncate_registers", "registers", "registers"),
     ("accept_overlaps", "memory", "memory")],
)
def test_a_broken_backend_fails_naming_the_contract(flaw: str, contract: str, selected: str) -> None:
    if kvm_unusable_reason():
        pytest.skip(f"the broken backend wraps KVM: {kvm_unusable_reason()}")
    result = run_kit("broken_backend:BrokenKvm", "-k", selected, BROKEN_FLAW=flaw)
    assert result.returncode != 0, result.stdout
    assert f"contract '{contract}' broken" in result.stdout, result.stdout
