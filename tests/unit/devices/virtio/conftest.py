"""Fixtures of the virtio device tests: guest memory, a running event loop (from the parent
conftest), and activated devices driven by :mod:`virtio_driver`. No /dev/kvm needed."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from virtio_driver import Harness  # noqa: E402

from vmmkit.eventloop import EventLoop  # noqa: E402
from vmmkit.memory import GuestMemory, MemoryRange  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """16 MiB of guest RAM at 0, another 1 MiB region right after it (buffers may span the two)."""
    with GuestMemory.allocate([MemoryRange(0, 16 * MIB), MemoryRange(16 * MIB, MIB)]) as mem:
        yield mem


@pytest.fixture
def activate(memory: GuestMemory, event_loop: EventLoop) -> Iterator[Callable[..., Harness]]:
    """``activate(device, **options)``: the device activated by the fake driver; reset and
    closed at the end of the test."""
    made: list[Harness] = []

    def make(device: Any, **options: Any) -> Harness:
        harness = Harness(device, options.pop("memory", memory), event_loop, **options).activate()
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
        harness.device.close()
