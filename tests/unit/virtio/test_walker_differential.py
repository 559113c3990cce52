"""The C chain walker against the Python reference on hostile descriptor tables.

Guest memory here has inaccessible host pages around every region (adjacent guest regions
included), so a C read one byte past a region faults the test instead of passing unnoticed;
every iovec the C walker returns is checked to lie inside the region its guest address is in.

Two runs share a time budget of about ten seconds: hypothesis (``VMMKIT_FUZZ_EXAMPLES``
examples, 400 by default; it shrinks a disagreement to a small table) and a seeded random run
of the same distribution that does many more cases per second (``VMMKIT_FUZZ_SECONDS``, 4 by
default, ``VMMKIT_FUZZ_SEED`` to replay).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vq_driver import FakeDriver, guarded_memory
from walker_cases import LAYOUT, RandomSource, cases, compare, generate, write_case

from vmmkit.memory import GuestMemory
from vmmkit.virtio import chain as vq
from vmmkit.virtio.chain import ErrorKind, Segment, VirtqueueError
from vmmkit.virtio.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1

pytestmark = pytest.mark.skipif(not vq.native_available(),
                                reason=f"native walker: {vq.NATIVE_UNAVAILABLE_REASON}")

EXAMPLES = int(os.environ.get("VMMKIT_FUZZ_EXAMPLES", "400"))
SECONDS = float(os.environ.get("VMMKIT_FUZZ_SECONDS", "4"))
SEED = int(os.environ.get("VMMKIT_FUZZ_SEED", str(time.time_ns() % 2**32)))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def guarded() -> Iterator[GuestMemory]:
    with guarded_memory(LAYOUT) as memory:
        yield memory


@FUZZ_SETTINGS
@given(case=cases())
def test_c_and_python_walkers_agree(guarded: GuestMemory, case: dict[str, object]) -> None:
    compare(guarded, case)


def test_random_cases_agree_and_reach_every_outcome(guarded: GuestMemory) -> None:
    """Many more cases than hypothesis can make in the time; the distribution must produce
    successful multi-segment chains and every error the walker knows, or it tests little."""
    source = RandomSource(SEED)
    seen: set[object] = set()
    runs = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline or runs < 2000:
        case = generate(source)
        try:
            result = compare(guarded, case)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n(replay with VMMKIT_FUZZ_SEED={SEED}, case {runs})") from None
        runs += 1
        seen.add("ok" if result[0] == "ok" else result[1])
        if result[0] == "ok" and len(result[2]) > 1:
            seen.add("multi-segment")
    missing = {"ok", "multi-segment", *(k for k in ErrorKind if k < 16)} - seen
    assert not missing, f"{runs} cases never produced {missing} (seed {SEED})"


@pytest.mark.parametrize(
    ("main", "expected"),
    [
        ([(0x3FF8, 0x10, 2, 0)], (Segment(0x3FF8, 8, True), Segment(0x4000, 8, True))),
        ([(0x5FF8, 0x10, 2, 0)], ErrorKind.ADDRESS),  # runs into the hole past region B
        ([(0x20000, 0x10, 2, 0)], ErrorKind.ADDRESS),  # writable in read-only memory
        ([(0x20000, 0x10, 0, 0)], (Segment(0x20000, 0x10, False),)),
        ([(0x1000, 0x10, 1, 0)], ErrorKind.LOOP),  # a one-entry table chained to itself
    ],
)
def test_known_answers(guarded: GuestMemory, main: list[tuple[int, int, int, int]], expected: object) -> None:
    case = {"size": 1, "desc_gpa": 0x1000, "main": main, "indirect_tables": [], "head": 0,
            "indirect": False, "capacity": 8}
    result = compare(guarded, case)
    assert (result[2] if result[0] == "ok" else result[1]) == expected


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases(), head=st.integers(0, 0xFFFF))
def test_queue_pops_agree(guarded: GuestMemory, case: dict[str, object], head: int) -> None:
    """Through Virtqueue.pop as well: the same chain or the same error with either walker."""
    results = []
    for native in (False, True):
        write_case(guarded, case)
        driver = FakeDriver(guarded, 16, desc=0x10000, avail=0x10800, used=0x10C00)
        driver.publish(head)
        queue = driver.queue(native=native, features=VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
        queue.size = case["size"]  # type: ignore[assignment]
        queue.desc_table = case["desc_gpa"]  # type: ignore[assignment]
        try:
            popped = queue.pop()
            results.append(("ok", popped.segments if popped else None))
        except VirtqueueError as exc:
            results.append(("error", exc.kind))
    assert results[0] == results[1]
