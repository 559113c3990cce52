"""The frontend's resume check for a backend without INFLIGHT_SHMFD (``vhost_user/resume.py``).

Rings here are a model (lists standing for guest memory); the soundness property is checked
against a simulated driver and device that complete in any order: whenever the check lets a
ring resume at its used index, the positions the dead device completed are exactly those
before it, so no request is served twice or lost."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmmkit_devices.vhost_user.resume import LossObservation, RingSnapshot, VhostUserResumeRefused, check_resume


class Rings:
    """A split ring's avail and used rings with free-running 16-bit indices."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.avail_ring = [0] * size
        self.used_ring = [0] * size
        self.avail_idx = start
        self.used_idx = start

    def make_available(self, head: int) -> int:
        position = self.avail_idx
        self.avail_ring[position % self.size] = head
        self.avail_idx = (position + 1) & 0xFFFF
        return position

    def complete(self, head: int) -> None:
        self.used_ring[self.used_idx % self.size] = head
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def snapshot(self) -> RingSnapshot:
        return RingSnapshot(self.size, self.avail_idx, self.used_idx, self.avail_ring.__getitem__,
                            self.used_ring.__getitem__)

    def seen(self) -> LossObservation:
        return LossObservation(self.used_idx, self.avail_idx)


def test_an_idle_ring_resumes() -> None:
    rings = Rings(8)
    for _ in range(20):
        rings.complete(rings.avail_ring[rings.make_available(3) % 8])
    check_resume(rings.snapshot(), None)
    check_resume(rings.snapshot(), rings.seen())


def test_a_request_made_available_after_the_loss_resumes_though_its_head_was_used_before() -> None:
    rings = Rings(8)
    for _ in range(5):  # queue depth 1, always head 0 (the guest's blkbench)
        rings.make_available(0)
        rings.complete(0)
    seen = rings.seen()
    rings.make_available(0)  # after the backend died
    check_resume(rings.snapshot(), seen)


def test_a_request_taken_before_the_loss_with_a_reused_head_is_refused() -> None:
    rings = Rings(8)
    for _ in range(5):
        rings.make_available(0)
        rings.complete(0)
    rings.make_available(0)  # taken by the backend (or not: nobody can tell), then the loss
    with pytest.raises(VhostUserResumeRefused, match="head 0"):
        check_resume(rings.snapshot(), rings.seen())


def test_an_out_of_order_completion_before_the_loss_is_refused() -> None:
    rings = Rings(8, start=0xFFFE)  # across the 16-bit wrap
    for head in (0, 3, 6, 9 % 8):
        rings.make_available(head)
    rings.complete(6)  # the third request first: resuming at the used index would serve it again
    with pytest.raises(VhostUserResumeRefused, match="out of order"):
        check_resume(rings.snapshot(), rings.seen())


def test_fresh_heads_outstanding_resume() -> None:
    rings = Rings(8)
    for head in (0, 1):
        rings.make_available(head)
        rings.complete(head)
    for head in (2, 3, 4):
        rings.make_available(head)
    check_resume(rings.snapshot(), rings.seen())


def test_an_avail_index_beyond_the_ring_is_refused() -> None:
    rings = Rings(4)
    rings.avail_idx = 9
    with pytest.raises(VhostUserResumeRefused, match="ahead of used index"):
        check_resume(rings.snapshot(), None)


@settings(max_examples=2000, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([1, 2, 4, 8]), start=st.integers(0, 0xFFFF),
       steps=st.integers(0, 40), lifo=st.booleans(), observe=st.booleans(), after=st.integers(0, 8))
def test_whenever_the_check_resumes_exactly_the_outstanding_requests_are_served(
    seed: int, size: int, start: int, steps: int, lifo: bool, observe: bool, after: int
) -> None:
    _simulate(seed, size, start, steps, lifo, observe, after)


def test_the_same_over_many_seeded_runs() -> None:
    for seed in range(20000):
        rng = random.Random(seed)
        _simulate(seed, rng.choice([2, 4]), rng.randrange(0x10000), rng.randrange(30), False, seed % 2 == 0,
                  rng.randrange(3))


def _simulate(seed: int, size: int, start: int, steps: int, lifo: bool, observe: bool, after: int) -> None:
    """A driver (heads from a LIFO or random free list, like Linux's and others') and a device
    that takes chains in order and completes them in any order; the device dies at a random
    point, the loss is (or is not) observed, the driver may queue more. Resuming at the used
    index must then serve exactly the requests not completed."""
    rng = random.Random(seed)
    rings = Rings(size, start)
    free = list(range(size))
    positions: list[int] = []  # unwrapped position -> head
    taken = 0  # positions the device took
    in_flight: list[int] = []  # positions taken, not completed
    completed: set[int] = set()

    def submit() -> None:
        head = free.pop() if lifo else free.pop(rng.randrange(len(free)))
        rings.make_available(head)
        positions.append(head)

    for _ in range(steps):
        action = rng.randrange(3)
        if action == 0 and free:
            submit()
        elif action == 1 and taken < len(positions):
            in_flight.append(taken)
            taken += 1
        elif action == 2 and in_flight:
            position = in_flight.pop(rng.randrange(len(in_flight)))
            rings.complete(positions[position])
            completed.add(position)
            free.append(positions[position])
    seen = rings.seen() if observe else None
    for _ in range(after):  # the driver goes on after the loss
        if free:
            submit()
    try:
        check_resume(rings.snapshot(), seen)
    except VhostUserResumeRefused:
        return
    assert completed == set(range(len(completed))), "resumed though a request was completed out of order"
