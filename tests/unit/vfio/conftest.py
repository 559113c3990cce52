"""Fixtures of the VFIO contract tests (a simulated /dev/vfio; see vfio_support)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vfio_support import Lab, VfioVm  # noqa: E402

from vmmkit.memory import GuestMemory, MemoryRange  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[tuple[Lab, GuestMemory]] = []

    def factory(vm: VfioVm | None = None) -> Lab:
        from pci_support import FakeMachine

        memory = GuestMemory.allocate([MemoryRange(0, 8 * MIB), MemoryRange(16 * MIB, 4 * MIB)])
        machine = FakeMachine(vm or VfioVm(), memory)
        machine.event_loop.start()
        lab = Lab(machine, tmp_path / f"sys{len(labs)}")
        labs.append((lab, memory))
        return lab

    yield factory
    for lab, memory in labs:
        lab.machine.close()
        memory.close()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab()
