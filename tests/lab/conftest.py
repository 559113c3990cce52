"""Fixtures for the lab's host-side tests: the AArch64 lab built (``lab/lab.py build``) or a skip
that says why it cannot be, and a runner for commands inside it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "lab" / "lab.py"


def load_lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmmkit_lab", LAB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vmmkit_lab"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def aarch64_lab() -> Any:
    """The built AArch64 lab's :class:`System` (its kernel, its ``nested/`` files)."""
    for tool in ("qemu-system-aarch64", "aarch64-linux-gnu-gcc", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"the AArch64 lab needs {tool}")
    build = subprocess.run([sys.executable, str(LAB), "build"], capture_output=True, text=True, timeout=1800)
    if build.returncode != 0:
        pytest.skip(f"the AArch64 lab cannot be built here: {build.stderr.strip().splitlines()[-1:]}")
    system = load_lab().System("aarch64")
    assert system.ready()
    return system


def run_in_lab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``lab.py run ARGS`` (options, then ``--`` and the command)."""
    return subprocess.run([sys.executable, str(LAB), "run", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def x86_64_lab() -> Any:
    """The built x86-64 lab's :class:`System` (QEMU TCG ``-cpu max``: AMD SVM with nested paging,
    Debian's amd64 kernel with ``kvm_amd``), or a skip that says why it cannot be built."""
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"the x86-64 lab needs {tool}")
    build = subprocess.run([sys.executable, str(LAB), "build", "--arch", "x86_64"], capture_output=True,
                           text=True, timeout=1800)
    if build.returncode != 0:
        pytest.skip(f"the x86-64 lab cannot be built here: {build.stderr.strip().splitlines()[-1:]}")
    system = load_lab().System("x86_64")
    assert system.ready()
    return system
