"""The event monitor's stream: Cloud Hypervisor's shape, from the machine's event names."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from vmmkit.config import ConfigError
from vmmkit.events import EventMonitor, read_events, split_event


@pytest.mark.parametrize(
    "name,pair",
    [
        ("vm-booted", ("vm", "booted")),
        ("vm-shutdown", ("vm", "shutdown")),
        ("vmm-starting", ("vmm", "starting")),
        ("virtio-device-activated", ("virtio-device", "activated")),
        ("guest-panic", ("guest", "panic")),
        ("vm-creating", None),
        ("vm", None),
        ("cpu-started", None),
    ],
)
def test_machine_names_become_source_and_event(name: str, pair: tuple[str, str] | None) -> None:
    assert split_event(name) == pair


def test_the_stream_is_chs_shape(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    monitor = EventMonitor.open(f"path={path}")
    monitor.event("vmm", "starting")
    monitor("vm-booted", {})
    monitor("virtio-device-activated", {"id": "_disk0"})
    monitor("vm-creating", {})  # CH has no such event
    monitor.close()
    text = path.read_text()
    assert text.endswith("}\n\n") and "\n  \"source\"" in text  # pretty-printed, blank line between
    events = list(read_events(text))
    assert [(e["source"], e["event"]) for e in events] == [
        ("vmm", "starting"), ("vm", "booted"), ("virtio-device", "activated")]
    assert events[0]["properties"] is None
    assert events[2]["properties"] == {"id": "_disk0"}
    for event in events:
        assert set(event) == {"timestamp", "source", "event", "properties"}
        assert set(event["timestamp"]) == {"secs", "nanos"}
        assert 0 <= event["timestamp"]["nanos"] < 10**9
    stamps = [(e["timestamp"]["secs"], e["timestamp"]["nanos"]) for e in events]
    assert stamps == sorted(stamps)


def test_an_inherited_fd_works_and_emitting_never_blocks(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    monitor = EventMonitor.open(f"fd={write_end}")
    done = threading.Event()

    def emit_many() -> None:
        for index in range(2000):  # far more than a pipe holds: the writer thread waits, not us
            monitor.event("vm", "booted", {"n": index})
        done.set()

    threading.Thread(target=emit_many, daemon=True).start()
    assert done.wait(5)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    monitor.close(timeout=10)
    reader.join(10)
    os.close(read_end)
    events = list(read_events(b"".join(chunks).decode()))
    assert len(events) == 2000 and events[-1]["properties"] == {"n": "1999"}


@pytest.mark.parametrize("spec", ["", "path=a,fd=3", "nope=1", "fd=x", "fd=987654"])
def test_bad_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        EventMonitor.open(spec)


def test_events_are_json_values_per_ch(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    monitor = EventMonitor.open(f"path={path}")
    monitor.event("guest", "panic", {"event": 1})
    monitor.close()
    (event,) = read_events(path.read_text())
    assert json.loads(json.dumps(event))["properties"] == {"event": "1"}  # CH's values are strings
