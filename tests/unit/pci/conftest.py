"""Fixtures for the PCI tests: a recording fake Vm, a fake machine with real buses, real
guest memory and the Machine's own interrupt allocators. No /dev/kvm needed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pci_support import RAM, FakeMachine, FakeVm  # noqa: E402

from vmmkit.memory import GuestMemory  # noqa: E402


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.allocate([RAM])
    yield mem
    mem.close()


@pytest.fixture
def vm() -> FakeVm:
    return FakeVm()


@pytest.fixture
def make_machine(memory: GuestMemory) -> Iterator[Callable[..., FakeMachine]]:
    machines: list[FakeMachine] = []

    def factory(vm: FakeVm | None = None, **kwargs: object) -> FakeMachine:
        machine = FakeMachine(vm or FakeVm(), memory, **kwargs)  # type: ignore[arg-type]
        machines.append(machine)
        return machine

    yield factory
    for machine in machines:
        machine.close()


@pytest.fixture
def machine(make_machine: Callable[..., FakeMachine], vm: FakeVm) -> FakeMachine:
    return make_machine(vm)
