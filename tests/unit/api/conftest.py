"""Fixtures for the API unit tests: a real :class:`vmmkit.vmm.Vmm` (no VM is booted, so no
/dev/kvm is needed) behind a real :class:`vmmkit.api.server.ApiServer` on a Unix socket."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmmkit.api.client import ApiClient  # noqa: E402
from vmmkit.api.server import ApiServer, bind_unix_socket  # noqa: E402
from vmmkit.vmm import Vmm  # noqa: E402


class RecordingEvents:
    """An event sink that keeps ``(source, event, properties)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, str] | None]] = []

    def event(self, source: str, event: str, properties: Any = None) -> None:
        self.events.append((source, event, dict(properties) if properties else None))

    def __call__(self, name: str, properties: dict[str, Any]) -> None:
        from vmmkit.events import split_event

        pair = split_event(name)
        if pair:
            self.event(*pair, properties)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vk-api-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def events() -> RecordingEvents:
    return RecordingEvents()


@pytest.fixture
def vmm(vmmkit_pm: Any, vmmkit_registries: Any, events: RecordingEvents) -> Iterator[Vmm]:
    vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm, events=events)
    yield vmm
    vmm.close()


@pytest.fixture
def server(vmm: Vmm, short_dir: Path) -> Iterator[ApiServer]:
    path = str(short_dir / "api.sock")
    server = ApiServer(vmm, bind_unix_socket(path), path=path, idle_timeout=5.0)
    server.start()
    yield server
    server.close()


@pytest.fixture
def client(server: ApiServer) -> ApiClient:
    assert server.path is not None
    return ApiClient(server.path, timeout=10.0)
