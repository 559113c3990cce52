"""The frontend's live reconnection to a backend without INFLIGHT_SHMFD (contract tests against
test_frontend.py's scripted backend, a simulation of a backend on a real socket): a ring whose
outstanding requests cannot have been completed out of order resumes at the used index; one where
a request may have been completed out of order fails the device with VhostUserResumeRefused and
no ring is started on the new backend (nothing served twice)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from vmmkit_devices.vhost_user import blk

from vmmkit.eventloop import EventLoop
from vmmkit.memory import GuestMemory
from vmmkit.vhost_user import protocol as p
from vmmkit.vhost_user.protocol import FrontendRequest as Req
from vmmkit.virtio.device import VIRTIO_F_VERSION_1


def _load_sibling(name: str) -> object:
    """The scripted backend and fixtures of test_frontend.py, by path (test modules are not a package)."""
    key = f"vmmkit_tests_vhost_user_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_frontend = _load_sibling("test_frontend")
BLK_FEATURES: int = _frontend.BLK_FEATURES  # type: ignore[attr-defined]
PF = p.ProtocolFeature
Interrupts = _frontend.Interrupts  # type: ignore[attr-defined]
ScriptedBackend = _frontend.ScriptedBackend  # type: ignore[attr-defined]
_context = _frontend._context  # type: ignore[attr-defined]
_wait = _frontend._wait  # type: ignore[attr-defined]
backend_factory = _frontend.backend_factory  # type: ignore[attr-defined]
loop = _frontend.loop  # type: ignore[attr-defined]
memory = _frontend.memory  # type: ignore[attr-defined]

NO_INFLIGHT = p.protocol_mask(PF.MQ, PF.REPLY_ACK, PF.CONFIG)
AVAIL, USED = 0x14000, 0x18000  # queue 0's rings in _context


def _ring(memory: GuestMemory, heads: list[int], used: list[int]) -> None:
    for slot, head in enumerate(heads):
        memory.write_u16(AVAIL + 4 + 2 * slot, head)
    memory.write_u16(AVAIL + 2, len(heads))
    for slot, head in enumerate(used):
        memory.write_u32(USED + 4 + 8 * slot, head)
        memory.write_u32(USED + 8 + 8 * slot, 1)
    memory.write_u16(USED + 2, len(used))


def _lose_backend(backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop,
                  heads: list[int], used: list[int]) -> tuple[ScriptedBackend, list[str]]:
    backend = backend_factory(features=BLK_FEATURES, protocol=NO_INFLIGHT)
    device = blk.create_device("d0", str(backend.path), num_queues=1, queue_size=128, event_loop=loop)
    broken: list[str] = []
    device.on_broken = broken.append
    device.ack_features(VIRTIO_F_VERSION_1)
    device.activate(_context(memory, loop, [128], Interrupts()))
    _ring(memory, heads, used)  # what the old backend left
    backend.drop_connection()

    def settled() -> bool:
        if backend.connections < 2 or backend.requests().count(Req.SET_OWNER) < 2:
            return False
        second = backend.requests()[backend.requests().index(Req.SET_OWNER, 1):]
        return bool(broken) or Req.SET_VRING_ENABLE in second

    assert _wait(settled)
    backend.device = device  # type: ignore[attr-defined]  # closed by the caller
    return backend, broken


def test_requests_taken_in_order_resume_at_the_used_index(backend_factory: Callable[..., ScriptedBackend],
                                                          memory: GuestMemory, loop: EventLoop) -> None:
    backend, broken = _lose_backend(backend_factory, memory, loop, heads=[0, 3, 6, 9, 12], used=[0, 3])
    try:
        assert not broken
        bases = [p.VringState.unpack(payload) for request, payload, _ in backend.log if request == Req.SET_VRING_BASE]
        assert bases[-1] == p.VringState(0, 2)
        assert Req.GET_INFLIGHT_FD not in backend.requests()
    finally:
        backend.device.close()  # type: ignore[attr-defined]


def test_a_request_completed_out_of_order_fails_the_device_by_name(
    backend_factory: Callable[..., ScriptedBackend], memory: GuestMemory, loop: EventLoop
) -> None:
    # Heads 0, 3, 6, 9 made available; the old backend completed 6 (the third) first.
    backend, broken = _lose_backend(backend_factory, memory, loop, heads=[0, 3, 6, 9], used=[6])
    try:
        assert _wait(lambda: bool(broken))
        assert broken[0].startswith("VhostUserResumeRefused: d0: queue 0:"), broken
        assert "head 6" in broken[0] and "INFLIGHT_SHMFD" in broken[0]
        second = backend.requests()[backend.requests().index(Req.SET_OWNER, 1):]
        assert Req.SET_VRING_BASE not in second and Req.SET_VRING_KICK not in second  # nothing served again
    finally:
        backend.device.close()  # type: ignore[attr-defined]
