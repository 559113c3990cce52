"""Fixtures for the x86-64 architecture's unit tests (no /dev/kvm needed)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from vmmkit_x86_64.layout import memory_layout
from x86_helpers import GUEST_BUILD, LINUX_DIR, make_config

from vmmkit.config import VmConfig
from vmmkit.memory import GuestMemory


@pytest.fixture
def config_factory() -> Callable[..., VmConfig]:
    return make_config


@pytest.fixture
def guest() -> Iterator[Callable[[int], tuple[Any, GuestMemory]]]:
    """``guest(size)`` -> ``(layout, memory)``; the memory is closed after the test."""
    opened: list[GuestMemory] = []

    def make(size: int = 64 << 20) -> tuple[Any, GuestMemory]:
        layout = memory_layout(size)
        memory = GuestMemory.allocate(layout.ram)
        opened.append(memory)
        return layout, memory

    yield make
    for memory in opened:
        memory.close()


@pytest.fixture(scope="session")
def linux_dir() -> Path:
    if not LINUX_DIR.is_dir():
        pytest.skip(f"{LINUX_DIR} is absent (../shared holds the Linux test kernel)")
    return LINUX_DIR


@pytest.fixture(scope="session")
def selftest_dir() -> Path:
    if not (GUEST_BUILD / "selftest.elf").is_file():
        pytest.skip(
            f"the test guest is not built ({GUEST_BUILD}/selftest.elf missing: run make -C tests/guests)"
        )
    return GUEST_BUILD


@pytest.fixture(scope="session")
def iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.skip("iasl is absent (apt-get install acpica-tools)")
    return path


@pytest.fixture(scope="session")
def acpiexec() -> str:
    path = shutil.which("acpiexec")
    if path is None:
        pytest.skip("acpiexec is absent (apt-get install acpica-tools)")
    return path
