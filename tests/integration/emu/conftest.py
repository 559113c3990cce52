"""Fixtures for the emu backend's tests.

These are the emu backend's own tests, so their ``vmmkit_hypervisor`` resolves to ``emu``
(counted as ``emu/<arch>`` in the backend report) unless the tox environment targets another
backend or another guest architecture, where they skip saying so. A test module names its guest
architecture with ``GUEST_ARCH`` (default ``x86_64``). Tiny AArch64 guests are assembled with
Debian's ``aarch64-linux-gnu`` binutils at test time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmmkit.testing import ARCH_ENV, HYPERVISOR_ENV

GUESTS = Path(__file__).resolve().parents[2] / "guests"


@pytest.fixture
def guest_arch(request: pytest.FixtureRequest) -> str:
    return str(getattr(request.module, "GUEST_ARCH", "x86_64"))


@pytest.fixture
def vmmkit_hypervisor(request: pytest.FixtureRequest, vmmkit_registries: Any, guest_arch: str) -> str:
    """``emu``, for this folder's tests, or a skip naming what the environment targets."""
    wanted = os.environ.get(HYPERVISOR_ENV, "auto")
    if wanted not in ("auto", "emu"):
        pytest.skip(f"the tox environment targets the {wanted} backend; these are the emu backend's tests")
    arch = os.environ.get(ARCH_ENV)
    if arch and arch != guest_arch:
        pytest.skip(f"the tox environment targets {arch} guests, this test boots {guest_arch}")
    if "emu" not in vmmkit_registries.hypervisors:
        pytest.skip("the vmmkit-emu plugin is not installed (pip install -e plugins/emu)")
    backend = vmmkit_registries.hypervisors.get("emu")
    availability = backend.is_available()
    if not availability:
        pytest.skip(f"hypervisor emu is not usable: {availability.reason}")
    request.node._vmmkit_backend = f"emu/{guest_arch}"
    return "emu"


@pytest.fixture(scope="session")
def emu() -> Any:
    """The emu backend itself, for tests that drive vCPUs directly."""
    from vmmkit_emu.hypervisor import EmuHypervisor

    availability = EmuHypervisor.is_available()
    if not availability:
        pytest.skip(f"the emu backend is not usable: {availability.reason}")
    return EmuHypervisor()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is needed (apt-get install binutils-aarch64-linux-gnu)")
    return path


def assemble_arm64(source: str, base: int) -> tuple[bytes, dict[str, int]]:
    """AArch64 ``source`` assembled and linked flat at ``base``: ``(code, symbols)``."""
    as_, ld = _tool("aarch64-linux-gnu-as"), _tool("aarch64-linux-gnu-ld")
    objcopy, nm = _tool("aarch64-linux-gnu-objcopy"), _tool("aarch64-linux-gnu-nm")
    with tempfile.TemporaryDirectory(prefix="vmmkit-a64-") as tmp:
        work = Path(tmp)
        (work / "guest.S").write_text(f".text\n.globl _start\n_start:\n{source}\n")
        steps = [[as_, "-o", "guest.o", "guest.S"],
                 [ld, "-N", "-nostdlib", f"-Ttext={base:#x}", "-o", "guest.elf", "guest.o"],
                 [objcopy, "-O", "binary", "guest.elf", "guest.bin"], [nm, "guest.elf"]]
        out = ""
        for step in steps:
            result = subprocess.run(step, cwd=work, capture_output=True, text=True)
            assert result.returncode == 0, f"{step[0]}: {result.stderr}\n{source}"
            out = result.stdout
        symbols = {parts[2]: int(parts[0], 16) for parts in (line.split() for line in out.splitlines())
                   if len(parts) == 3}
        return (work / "guest.bin").read_bytes(), symbols


@pytest.fixture(scope="session")
def arm64_assemble() -> Callable[[str, int], tuple[bytes, dict[str, int]]]:
    return assemble_arm64


def _built(arch: str, name: str) -> Path:
    path = GUESTS / "build" / arch / name
    if not path.is_file():
        if arch == "aarch64" and shutil.which("aarch64-linux-gnu-gcc") is None:
            pytest.skip("the AArch64 test guest needs gcc-aarch64-linux-gnu (apt-get install it)")
        result = subprocess.run(["make", "-s", "-C", str(GUESTS), f"ARCH={arch}"], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"building the {arch} test guest failed:\n{result.stderr}")
    return path


@pytest.fixture(scope="session")
def selftest_image() -> Path:
    """The AArch64 test guest, ``tests/guests/build/aarch64/selftest.Image`` (built if needed)."""
    return _built("aarch64", "selftest.Image")
