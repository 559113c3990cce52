"""Live migration of a VM with memory zones between two real vmmkit processes (issue 16):
``send-migration --local`` hands each zone over (a memfd zone's memfd, a file zone's file, as a
Kata template's zone), the destination maps the very same files and the heartbeat goes on
without a gap; a copying migration of that VM on one host is refused by name and the source
keeps running."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .conftest import wait_for
from .test_api_migration import destination, heartbeat_numbers, receive_in_background, send, spinning

__all__ = ["destination"]  # the fixture, shared with test_api_migration.py

MIB = 1 << 20


def _zones(short_dir: Path) -> dict[str, Any]:
    return {"size": 0, "zones": [{"id": "low", "size": 32 * MIB, "shared": True},
                                 {"id": "mem0", "size": 32 * MIB, "file": str(short_dir / "zone.ram"), "shared": True}]}


def _file_inodes(pid: int, *prefixes: str) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes):
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            pass
    return inodes


def test_local_migration_hands_every_zone_over(start_vmm: Any, destination: Any, selftest_elf: Path,
                                               short_dir: Path) -> None:
    source = spinning(start_vmm, selftest_elf, memory=_zones(short_dir))
    held = _file_inodes(source.proc.pid, "/memfd:vmmkit-ram", str(short_dir / "zone.ram"))
    assert len(held) == 2 and (short_dir / "zone.ram").stat().st_ino in held, held
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    send(source, url, "--local")
    assert receiver.wait(60) == 0, receiver.stderr.read() if receiver.stderr else ""
    assert source.wait_exit(30) == 0
    assert _file_inodes(target.proc.pid, "/memfd:vmmkit-ram", str(short_dir / "zone.ram")) == held  # no copy
    serial = short_dir / "serial.log"
    before = heartbeat_numbers(serial.read_text(errors="replace"))
    beats = wait_for(lambda: len(heartbeat_numbers(serial.read_text(errors="replace"))) >= len(before) + 2
                     and heartbeat_numbers(serial.read_text(errors="replace")), 60, "heartbeats after migration")
    assert beats == list(range(1, len(beats) + 1)), beats
    target.remote("shutdown-vmm")
    assert target.wait_exit() == 0


def test_copying_into_the_sources_zone_file_is_refused(start_vmm: Any, destination: Any, selftest_elf: Path,
                                                       short_dir: Path) -> None:
    source = spinning(start_vmm, selftest_elf, memory=_zones(short_dir))
    target = destination()
    url = f"unix:{short_dir}/mig.sock"
    receiver = receive_in_background(target, url)
    wait_for(lambda: ("vm", "receiving-migration") in target.events(), 20, "the receiver to listen")
    refused = send(source, url, check=False)
    assert refused.returncode != 0 and "is the file the source VM runs on" in refused.stderr, refused.stderr
    assert "local=true" in refused.stderr
    assert receiver.wait(60) != 0
    assert source.info()["state"] == "Running"
    count = source.heartbeats()
    wait_for(lambda: source.heartbeats() >= count + 2, 60, "the source's heartbeat")
