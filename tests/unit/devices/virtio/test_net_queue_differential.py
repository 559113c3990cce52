"""The C virtio-net queues (``native/net_queue.c``) against the Python reference on random and
hostile rings and tap traffic (:mod:`net_queue_cases`): used rings, guest memory, the frames
written to the tap, the frames left on it, counters and whether the device failed must be
identical."""

from __future__ import annotations

import random

import pytest
from net_queue_cases import compare, generate
from vmmkit_devices.virtio import net_io

pytestmark = pytest.mark.skipif(not net_io.native_net_available(),
                                reason=f"native net queues: {net_io.NATIVE_NET_UNAVAILABLE_REASON}")


@pytest.mark.parametrize("seed", range(30))
def test_c_queues_agree_with_the_python_device(seed: int) -> None:
    rng = random.Random(seed * 7919 + 5)
    for _ in range(4):
        compare(generate(rng))


def test_the_comparison_sees_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C path that answered differently would be caught: make it skip the RX header policy."""
    from vmmkit_devices.virtio import net

    case = {"features": net.VIRTIO_NET_F_MRG_RXBUF, "rx": [("chain", [(2048, True)], False)], "tx": [],
            "frames": [b"\x02" + bytes(11) + bytes(range(60))], "avail_jump": False, "seed": 1}
    compare(case)  # without GUEST_CSUM both sides zero the tap's DATA_VALID flag
    original = net.NetDevice._native_flags

    def with_guest_csum(self: net.NetDevice) -> int:
        return original(self) | net_io._lib.NETQ_F_GUEST_CSUM

    monkeypatch.setattr(net.NetDevice, "_native_flags", with_guest_csum)
    with pytest.raises(AssertionError, match="guest memory differs"):
        compare(case)
