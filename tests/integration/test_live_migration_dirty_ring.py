"""Live migration's pre-copy reads KVM's dirty ring where KVM offers it (issue 16, item 3): the
source VM's rounds are harvested from the ring, and the guest goes on at the destination."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmmkit.vmm import Vmm

from .test_live_migration import heartbeats, make_vmm, receiving, spinning, wait_for

pytestmark = pytest.mark.requires_kvm

__all__ = ["make_vmm"]  # the fixture, imported for this module's tests


def test_pre_copy_harvests_the_dirty_ring(make_vmm: Callable[[str], Vmm], selftest_elf: Path,
                                          tmp_path: Path) -> None:
    source = spinning(make_vmm, selftest_elf, tmp_path / "serial.log")
    vm = source.machine.vm  # type: ignore[union-attr]
    rings = getattr(vm, "dirty_rings", None)
    if rings is None:
        pytest.skip(f"this KVM logs dirty pages with the bitmap ({vm.dirty_log_mode})")
    taken: list[int] = []
    get_dirty_log = vm.get_dirty_log

    def recording(slot: int) -> bytes:
        bitmap = get_dirty_log(slot)
        taken.append(sum(bin(byte).count("1") for byte in bitmap))
        return bitmap

    vm.get_dirty_log = recording
    target = make_vmm("kvm")
    path = tmp_path / "m.sock"
    thread, errors = receiving(target, f"unix:{path}", path)
    source.send_migration(f"unix:{path}")()
    thread.join(60)
    assert not errors, errors
    assert taken, "pre-copy never read the dirty log"
    assert rings.harvests >= len(taken) and rings.entries_read > 0 and sum(taken) > 0
    serial = tmp_path / "serial.log"
    seen = len(heartbeats(serial))
    wait_for(lambda: len(heartbeats(serial)) > seen)  # the destination's guest writes on
    assert target.state == "Running" and source.done
