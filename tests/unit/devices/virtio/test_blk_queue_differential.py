"""The C virtio-blk queue (``native/blk_queue.c``) against the Python reference on random and
hostile request rings (:mod:`blk_queue_cases`): used rings, guest memory, image files, counters
and whether the device failed must be identical."""

from __future__ import annotations

import random

import pytest
from blk_queue_cases import OVERLAPPED, compare, generate
from vmmkit_devices.virtio import blk_io

pytestmark = pytest.mark.skipif(not blk_io.native_queue_available(),
                                reason=f"native block queue: {blk_io.NATIVE_QUEUE_UNAVAILABLE_REASON}")


@pytest.mark.parametrize("in_flight", ["1", "4"])
@pytest.mark.parametrize("seed", range(30))
def test_c_queue_agrees_with_the_python_device(seed: int, in_flight: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 4 in flight the C queue serves independent IN/OUT requests at once on its pool:
    the outcome must still be the sequential one."""
    monkeypatch.setenv("VMMKIT_BLK_IN_FLIGHT", in_flight)
    rng = random.Random(seed * 7919 + 1)
    for _ in range(5):
        compare(generate(rng))


def test_the_pool_serves_requests_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases above do reach the pool (else the 4-in-flight runs would prove nothing)."""
    monkeypatch.setenv("VMMKIT_BLK_IN_FLIGHT", "4")
    OVERLAPPED.clear()
    rng = random.Random(99)
    for _ in range(40):
        compare(generate(rng))
    assert sum(OVERLAPPED) >= 10, OVERLAPPED


def test_the_comparison_sees_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C queue that answered differently would be caught: make it serve a wrong serial."""
    from vmmkit_devices.virtio import block

    case = {"chains": [("request", [(bytes(16 - 8) + bytes(8), False), (20, True), (1, True)], False, 1)],
            "avail_jump": False, "readonly": False, "seed": 3}
    case["chains"][0][1][0] = (b"\x08" + bytes(15), False)  # GET_ID
    compare(case)
    original = block.BlockDevice.__init__

    def wrong_serial(self: block.BlockDevice, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.native_queue:
            self.serial = b"X" * 20

    monkeypatch.setattr(block.BlockDevice, "__init__", wrong_serial)
    with pytest.raises(AssertionError, match="guest memory differs"):
        compare(case)
