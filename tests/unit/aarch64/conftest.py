"""Fixtures for the AArch64 architecture's unit tests (no hypervisor needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from vmmkit_aarch64.layout import memory_layout

from vmmkit.memory import GuestMemory


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
