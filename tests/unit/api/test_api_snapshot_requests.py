"""``vm.snapshot`` / ``vm.restore`` requests that never reach a VM: the bodies are checked as
Cloud Hypervisor's ``VmSnapshotConfig`` / ``RestoreConfig`` and every refusal says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmmkit.api.client import ApiClient, ApiError


def refusal(client: ApiClient, endpoint: str, body: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        client.request("PUT", endpoint, body)
    return info.value.status, " ".join(info.value.messages)


@pytest.mark.parametrize(("body", "message"), [
    ({}, "destination_url: a file:///<directory> URL is required"),
    ({"destination_url": 3}, "destination_url: a file:///<directory> URL is required"),
    ({"destination_url": "file:///tmp/x", "compress": True}, "VmSnapshotConfig has no compress"),
])
def test_bad_snapshot_bodies(client: ApiClient, body: Any, message: str) -> None:
    status, text = refusal(client, "vm.snapshot", body)
    assert status == 400 and message in text


def test_snapshot_without_a_vm(client: ApiClient) -> None:
    status, message = refusal(client, "vm.snapshot", {"destination_url": "file:///tmp/x"})
    assert status == 404 and "not created" in message


@pytest.mark.parametrize(("body", "message"), [
    ({}, "source_url: a file:///<directory> URL is required"),
    ({"source_url": "file:///tmp/x", "prefault": "yes"}, "prefault: true or false, not 'yes'"),
    ({"source_url": "file:///tmp/x", "memory_restore_mode": "OnDemand"},
     "memory_restore_mode: not supported yet (memory restore modes (memory is always mapped on demand))"),
    ({"source_url": "file:///tmp/x", "zone_updates": [{"id": "z"}]}, "zone_updates: not supported yet (memory zones)"),
    ({"source_url": "file:///tmp/x", "speed": 1}, "RestoreConfig has no speed"),
    ({"source_url": "unix:/tmp/x"}, "source_url: 'unix:/tmp/x' is not a file:///<directory> URL"),
])
def test_bad_restore_bodies(client: ApiClient, body: Any, message: str) -> None:
    status, text = refusal(client, "vm.restore", body)
    assert status == 400 and message in text


def test_restore_of_what_is_not_a_snapshot(client: ApiClient, tmp_path: Path) -> None:
    status, text = refusal(client, "vm.restore", {"source_url": f"file://{tmp_path}/none"})
    assert status == 400 and "no such snapshot directory" in text
    (tmp_path / "snapshot.json").write_text('{"format": "something else"}')
    status, text = refusal(client, "vm.restore", {"source_url": f"file://{tmp_path}"})
    assert status == 400 and "not a vmmkit snapshot manifest" in text
    with pytest.raises(ApiError) as info:
        client.request("GET", "vm.info")
    assert info.value.status == 404  # nothing was created
