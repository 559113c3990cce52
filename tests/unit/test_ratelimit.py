"""The token buckets and the rate limiter of vmmkit.ratelimit, on a fake clock and a fake timer
(CH's rate_limiter semantics: size, one_time_burst, refill_time in ms; over-consumption)."""

from __future__ import annotations

import os
import select
import time

import pytest

from vmmkit.config import RateLimiterConfig
from vmmkit.config import TokenBucket as BucketConfig
from vmmkit.errors import VmmError
from vmmkit.eventloop import EventLoop
from vmmkit.ratelimit import (
    MAX_WAIT_NS,
    MIN_WAIT_NS,
    NS_PER_MS,
    RateLimiter,
    RateLimitGroups,
    TimerFd,
    TokenBucket,
    TokenKind,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)


class FakeTimer:
    def __init__(self) -> None:
        self.armed: list[int] = []
        self.closed = False

    def arm(self, delay_ns: int) -> None:
        self.armed.append(delay_ns)

    def close(self) -> None:
        self.closed = True


def test_bucket_starts_full_and_refills_at_size_per_refill_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 100, clock=clock)
    assert bucket.reduce(1000)
    assert not bucket.reduce(1)
    clock.advance_ms(10)  # 10 % of the refill time: 100 tokens
    assert bucket.budget == pytest.approx(100)
    assert not bucket.reduce(101)
    assert bucket.reduce(100)
    clock.advance_ms(10_000)  # never above size
    assert bucket.budget == 1000


def test_fractions_of_a_token_are_not_lost_between_refills() -> None:
    clock = FakeClock()
    bucket = TokenBucket(3, 1000, clock=clock)  # 3 tokens/s: one every 333.3 ms
    assert bucket.reduce(3)
    passed = 0
    for _ in range(3000):  # 3 s in 1 ms steps, asking for one token each step
        clock.advance_ms(1)
        passed += bucket.reduce(1)
    assert passed == 9


def test_one_time_burst_is_spent_first_and_never_refilled() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 1000, one_time_burst=500, clock=clock)
    assert bucket.reduce(500)
    assert bucket.one_time_burst == 0
    assert bucket.budget == 100  # the bucket itself untouched
    assert bucket.reduce(100)
    clock.advance_ms(10_000)
    assert bucket.one_time_burst == 0 and bucket.budget == 100


def test_one_time_burst_partly_covering_a_request_takes_the_rest_from_the_budget() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 1000, one_time_burst=30, clock=clock)
    assert bucket.reduce(50)
    assert bucket.one_time_burst == 0 and bucket.budget == 80
    bucket2 = TokenBucket(10, 1000, one_time_burst=5, clock=clock)
    assert bucket2.reduce(11)  # 5 from the burst, 6 from the budget
    assert bucket2.one_time_burst == 0 and bucket2.budget == 4
    bucket3 = TokenBucket(10, 1000, one_time_burst=5, clock=clock)
    assert bucket3.reduce(10)
    assert not bucket3.reduce(10)  # 5 left, the burst is gone: refused, nothing taken
    assert bucket3.budget == 5


def test_over_consumption_passes_once_and_leaves_a_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 100, clock=clock)
    assert bucket.reduce(250)  # larger than the bucket: CH's OverConsumption
    assert bucket.budget == -150
    assert not bucket.reduce(1)
    assert bucket.wait_ns(1) == 151 * NS_PER_MS  # repay 150, then one token
    clock.advance_ms(150)
    assert not bucket.reduce(1)
    clock.advance_ms(1)
    assert bucket.reduce(1)


def test_wait_ns_is_the_refill_time_of_the_missing_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, 1000, clock=clock)  # 1 MB/s
    assert bucket.reduce(1_000_000)
    assert bucket.wait_ns(250_000) == 250 * NS_PER_MS
    assert bucket.wait_ns(10**12) == 1000 * NS_PER_MS  # capped at the bucket size
    clock.advance_ms(250)
    assert bucket.wait_ns(250_000) == 0


def test_replenish_gives_back_without_exceeding_size() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1000, clock=clock)
    assert bucket.reduce(4)
    bucket.replenish(100)
    assert bucket.budget == 10


@pytest.mark.parametrize(("size", "refill", "burst"), [(0, 1, 0), (1, 0, 0), (-1, 10, 0), (1, 1, -1)])
def test_bucket_refuses_empty_or_negative_parameters(size: int, refill: int, burst: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TokenBucket(size, refill, burst)


def test_limiter_request_takes_op_and_bytes_or_neither_and_blocks() -> None:
    clock, timer = FakeClock(), FakeTimer()
    limiter = RateLimiter(TokenBucket(1000, 1000, clock=clock), TokenBucket(10, 1000, clock=clock), timer=timer)
    assert limiter.consume_request(600)
    assert not limiter.consume_request(600)  # 400 bytes left: refused
    ops = limiter.bucket(TokenKind.OPS)
    assert ops is not None and ops.budget == 9  # the op was given back
    assert limiter.blocked and limiter.throttled == 1
    assert timer.armed == [200 * NS_PER_MS]  # 200 more bytes at 1 byte/ms
    clock.advance_ms(500)
    assert not limiter.consume_request(1)  # blocked until the timer fires, as CH
    limiter.on_timer()
    assert not limiter.blocked
    assert limiter.consume_request(600)


def test_limiter_timer_delay_is_clamped() -> None:
    clock, timer = FakeClock(), FakeTimer()
    limiter = RateLimiter(TokenBucket(10**6, 10**9, clock=clock), timer=timer)  # 1 token per 1000 s
    assert limiter.consume(10**6, TokenKind.BYTES)
    assert not limiter.consume(1, TokenKind.BYTES)
    assert timer.armed == [MAX_WAIT_NS]
    fast = RateLimiter(TokenBucket(10**9, 1, clock=clock), timer=timer)
    assert fast.consume(10**9, TokenKind.BYTES)
    assert not fast.consume(1, TokenKind.BYTES)
    assert timer.armed[-1] == MIN_WAIT_NS


def test_limiter_without_a_bucket_of_a_kind_does_not_limit_it() -> None:
    clock, timer = FakeClock(), FakeTimer()
    limiter = RateLimiter(ops=TokenBucket(2, 1000, clock=clock), timer=timer)
    assert limiter.consume_request(10**12) and limiter.consume_request(10**12)
    assert not limiter.consume_request(0)
    assert limiter.consume(10**12, TokenKind.BYTES) is False  # blocked as a whole until the timer


def test_force_leaves_a_debt_that_blocks() -> None:
    clock, timer = FakeClock(), FakeTimer()
    limiter = RateLimiter(TokenBucket(100, 100, clock=clock), timer=timer)
    limiter.force(300, TokenKind.BYTES)
    assert limiter.blocked and timer.armed == [200 * NS_PER_MS]
    limiter.on_timer()
    clock.advance_ms(200)
    assert limiter.consume(1, TokenKind.BYTES) is False  # debt repaid, the bucket still empty
    limiter.on_timer()
    clock.advance_ms(1)
    assert limiter.consume(1, TokenKind.BYTES)


def test_long_run_rate_matches_the_configuration() -> None:
    """A greedy consumer of 4 KiB requests, retrying whenever the timer would fire, gets
    size / refill_time bytes per second over a long run."""
    clock, timer = FakeClock(), FakeTimer()
    config = RateLimiterConfig(bandwidth=BucketConfig(size=1 << 20, refill_time=1000))  # 1 MiB/s
    limiter = RateLimiter.from_config(config, clock=clock, timer=timer)
    start, moved = clock.now, 0
    while clock.now - start < 10_000 * NS_PER_MS:
        if limiter.consume_request(4096):
            moved += 4096
            continue
        clock.now += timer.armed[-1]
        limiter.on_timer()
    rate = moved / ((clock.now - start) / 1e9)
    assert rate == pytest.approx((1 << 20) * 1.1, rel=0.02)  # 1 MiB/s plus the first full bucket over 10 s


def test_timerfd_fires_once_on_the_event_loop_and_wakes_listeners() -> None:
    loop = EventLoop("test-ratelimit")
    loop.start()
    woken: list[float] = []
    limiter = RateLimiter(TokenBucket(1000, 50))
    try:
        limiter.subscribe(loop, lambda: woken.append(time.monotonic()))
        started = time.monotonic()
        assert limiter.consume(1000, TokenKind.BYTES)
        assert not limiter.consume(500, TokenKind.BYTES)  # 25 ms of refill
        deadline = time.monotonic() + 5
        while not woken and time.monotonic() < deadline:
            time.sleep(0.005)
        assert woken and woken[0] - started >= 0.020
        assert not limiter.blocked
        assert limiter.consume(500, TokenKind.BYTES)
    finally:
        limiter.close()
        loop.close()


def test_timerfd_arm_of_zero_still_fires() -> None:
    timer = TimerFd()
    try:
        timer.arm(0)
        poller = select.poll()
        poller.register(timer.fd, select.POLLIN)
        assert poller.poll(1000)
        assert len(os.read(timer.fd, 8)) == 8
    finally:
        timer.close()


def test_groups_share_one_limiter_and_name_the_missing_one() -> None:
    config = RateLimiterConfig(ops=BucketConfig(size=5, refill_time=100))
    groups = RateLimitGroups({"g1": config})
    try:
        assert groups.get("g1") is groups.get("g1")
        with pytest.raises(VmmError, match="no rate limit group 'nope' \\(groups: g1\\)"):
            groups.get("nope")
    finally:
        groups.close()
