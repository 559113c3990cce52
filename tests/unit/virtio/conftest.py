"""Fixtures of the virtio SDK tests: guest memory, and both chain walkers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.virtio import chain

MIB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """1 MiB + an adjacent 1 MiB (a buffer may span them), a hole, then 1 MiB at 4 MiB."""
    with GuestMemory.allocate([MemoryRange(0, MIB), MemoryRange(MIB, MIB), MemoryRange(4 * MIB, MIB)]) as mem:
        yield mem


def _walker_params() -> list[object]:
    native = pytest.param(True, id="native", marks=pytest.mark.skipif(
        not chain.native_available(), reason=f"native walker: {chain.NATIVE_UNAVAILABLE_REASON}"))
    return [pytest.param(False, id="python"), native]


@pytest.fixture(params=_walker_params())
def native(request: pytest.FixtureRequest) -> bool:
    """Run the test with the Python walker and with the C walker."""
    return bool(request.param)
