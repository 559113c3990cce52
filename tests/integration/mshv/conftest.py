"""Fixtures for the MSHV backend's tests. They run the production backend on the simulated
``/dev/mshv`` (:mod:`vmmkit_mshv.simulator`): CONTRACT TESTS of the backend against the kernel
interface as the upstream sources define it, not runs on the Microsoft Hypervisor."""

from __future__ import annotations

import os
from typing import Any

import pytest

from vmmkit.testing import ARCH_ENV, HYPERVISOR_ENV


@pytest.fixture
def simulated_mshv(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``MshvHypervisor`` talking to the simulated kernel (``VMMKIT_MSHV_KERNEL=simulated``)."""
    wanted = os.environ.get(HYPERVISOR_ENV, "auto")
    if wanted not in ("auto", "mshv"):
        pytest.skip(f"the tox environment targets the {wanted} backend; these are the mshv backend's tests")
    if os.environ.get(ARCH_ENV, "x86_64") != "x86_64":
        pytest.skip("the mshv backend runs x86_64 guests")
    pytest.importorskip("vmmkit_emu", reason="the simulated /dev/mshv runs on the vmmkit-emu plugin's engine")
    from vmmkit_mshv.hypervisor import MshvHypervisor
    from vmmkit_mshv.kernel import KERNEL_ENV, SIMULATED

    monkeypatch.setenv(KERNEL_ENV, SIMULATED)
    availability = MshvHypervisor.is_available()
    if not availability:
        pytest.skip(f"the simulated /dev/mshv is not usable: {availability.reason}")
    request.node._vmmkit_backend = "mshv/x86_64"  # counted in the backend report (vmmkit.testing)
    return MshvHypervisor()
