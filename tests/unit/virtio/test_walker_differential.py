"""The C chain walker against the Python reference on hostile descriptor tables.

Guest memory here has inaccessible host pages around every region (adjacent guest regions
included), so a C read one byte past a region faults the test instead of passing unnoticed;
every iovec the C walker returns is checked to lie inside the region its guest address is in.
About 10 seconds of hypothesis examples (``VMMKIT_FUZZ_EXAMPLES`` to change).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_driver import guarded_memory
from walker_cases import LAYOUT, cases, compare

from vmmkit.memory import GuestMemory
from vmmkit.virtio import chain as vq
from vmmkit.virtio.chain import ErrorKind, Segment

pytestmark = pytest.mark.skipif(not vq.native_available(), reason=f"native walker: {vq.NATIVE_UNAVAILABLE_REASON}")

EXAMPLES = int(os.environ.get("VMMKIT_FUZZ_EXAMPLES", "6000"))


def test_native_walker_is_built() -> None:
    """``pip install -e .`` builds vmmkit.virtio._native; a missing build must not pass quietly."""
    assert vq.native_available(), vq.NATIVE_UNAVAILABLE_REASON


@pytest.fixture(scope="module")
def guarded() -> Iterator[GuestMemory]:
    with guarded_memory(LAYOUT) as memory:
        yield memory


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_c_and_python_walkers_agree(guarded: GuestMemory, case: dict[str, object]) -> None:
    compare(guarded, case)


def test_the_fuzzer_reaches_every_outcome(guarded: GuestMemory) -> None:
    """The generator is worth its time only if it makes successful chains and every error."""
    seen: set[object] = set()

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases())
    def explore(case: dict[str, object]) -> None:
        result = compare(guarded, case)
        seen.add("ok" if result[0] == "ok" else result[1])
        if result[0] == "ok" and len(result[2]) > 1:
            seen.add("multi-segment")

    explore()
    missing = {"ok", "multi-segment", *(k for k in ErrorKind if k < 16)} - seen
    assert not missing, f"never produced: {missing}"


@pytest.mark.parametrize(
    ("main", "expected"),
    [
        ([(0x3FF8, 0x10, 2, 0)], (Segment(0x3FF8, 8, True), Segment(0x4000, 8, True))),
        ([(0x5FF8, 0x10, 2, 0)], ErrorKind.ADDRESS),  # runs into the hole past region B
        ([(0x20000, 0x10, 2, 0)], ErrorKind.ADDRESS),  # writable in read-only memory
        ([(0x20000, 0x10, 0, 0)], (Segment(0x20000, 0x10, False),)),
    ],
)
def test_known_answers(guarded: GuestMemory, main: list[tuple[int, int, int, int]], expected: object) -> None:
    case = {"size": 1, "desc_gpa": 0x1000, "main": main, "indirect_tables": [], "head": 0,
            "indirect": False, "capacity": 8}
    result = compare(guarded, case)
    assert (result[2] if result[0] == "ok" else result[1]) == expected


@given(st.data())
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_queue_pops_agree(guarded: GuestMemory, data: st.DataObject) -> None:
    """Through Virtqueue.pop as well: same chain or same error with either walker."""
    from vq_driver import FakeDriver

    from vmmkit.virtio.chain import VirtqueueError
    from vmmkit.virtio.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1

    case = data.draw(cases())
    results = []
    for native in (False, True):
        from walker_cases import write_case

        write_case(guarded, case)
        size = case["size"] if 0 < case["size"] <= 16 else 16
        driver = FakeDriver(guarded, size, desc=0x10000, avail=0x10800, used=0x10C00)
        driver.publish(case["head"] & 0xFFFF)
        queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
        queue.desc_table = case["desc_gpa"] if 0 <= case["desc_gpa"] < 2**64 else 0
        try:
            popped = queue.pop()
            results.append(("ok", popped.segments if popped else None))
        except VirtqueueError as exc:
            results.append(("error", exc.kind))
    assert results[0] == results[1]
