"""Fixtures for the platform-device tests: a real event loop, a recording interrupt line and a
fake :class:`vmmkit.device.DeviceContext`. No /dev/kvm needed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import vmmkit_devices  # noqa: F401
except ImportError:  # not installed: use the source tree (pip install -e plugins/devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins" / "devices" / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from devices_support import FakeContext, RecordingLine  # noqa: E402

from vmmkit.eventloop import EventLoop  # noqa: E402


@pytest.fixture
def event_loop() -> Iterator[EventLoop]:
    loop = EventLoop(name="test-events")
    loop.start()
    yield loop
    loop.close()


@pytest.fixture
def line() -> RecordingLine:
    return RecordingLine()


@pytest.fixture
def ctx(event_loop: EventLoop) -> FakeContext:
    return FakeContext(event_loop)
