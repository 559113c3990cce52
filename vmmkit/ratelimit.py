"""I/O rate limiting with token buckets, as Cloud Hypervisor's ``rate_limiter`` crate (and
Firecracker's, which it comes from) does it: one bucket for bytes, one for operations.

A :class:`TokenBucket` holds ``size`` tokens, starts full, and refills at ``size`` tokens per
``refill_time`` milliseconds, never above ``size``. ``one_time_burst`` tokens are spent first and
never come back. A request larger than the whole bucket is let through once (CH's
``BucketReduction::OverConsumption``) and leaves the bucket in debt: nothing else passes until
the debt is repaid, so the long-term rate holds. Unlike CH, which keeps whole tokens and refills
by ``elapsed * size / refill_time`` after reducing the fraction, the budget here is kept exactly
in token-nanoseconds, so no fraction of a token is ever lost between refills.

A :class:`RateLimiter` pairs the two buckets (either may be absent) with a lock (the queues of a
disk, or the disks of a rate-limit group, consume from several threads) and a timer. When a
request does not fit, the limiter becomes *blocked* and arms its timer for the time the request's
tokens need to refill (between :data:`MIN_WAIT_NS` and :data:`MAX_WAIT_NS`; CH waits a fixed
100 ms); while blocked every consumption fails at once, as in CH. When the timer fires
(:meth:`RateLimiter.on_timer`, on the VM's event loop for a :class:`TimerFd`), the limiter is
unblocked and calls its listeners: each device looks at its queues again. A device that is
refused leaves the request where it was (a virtqueue chain goes back to the available ring),
it never drops it.

The buckets take the time from a clock given to them (``time.monotonic_ns`` by default), so the
unit tests drive them with a fake clock and a fake timer.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from vmmkit.errors import VmmError

if TYPE_CHECKING:
    from vmmkit.config import RateLimiterConfig
    from vmmkit.eventloop import EventLoop

NS_PER_MS: Final = 1_000_000
#: The shortest and longest a blocked limiter waits before it lets its users try again.
MIN_WAIT_NS: Final = 1 * NS_PER_MS
MAX_WAIT_NS: Final = 1000 * NS_PER_MS

Clock = Callable[[], int]


class TokenKind(enum.Enum):
    """What a request spends: bytes (the ``bandwidth`` bucket) or operations (``ops``)."""

    BYTES = "bandwidth"
    OPS = "ops"


class TokenBucket:
    """One token bucket (pure: the time comes from ``clock``, in nanoseconds).

    :param size: tokens the bucket holds (at least 1).
    :param refill_time: milliseconds to refill from empty to full (at least 1).
    :param one_time_burst: extra tokens spent first, never refilled.
    """

    def __init__(self, size: int, refill_time: int, one_time_burst: int = 0, *,
                 clock: Clock = time.monotonic_ns) -> None:
        if size < 1 or refill_time < 1 or one_time_burst < 0:
            raise ValueError(f"token bucket size {size}, refill_time {refill_time} ms, "
                             f"one_time_burst {one_time_burst}: size and refill_time must be at least 1")
        self.size = size
        self.refill_time = refill_time
        self.one_time_burst = one_time_burst
        self._clock = clock
        self._refill_ns = refill_time * NS_PER_MS
        #: The budget in token-nanoseconds (tokens * refill_ns): size tokens refill in refill_ns.
        self._scaled = size * self._refill_ns
        self._last = clock()

    @property
    def budget(self) -> float:
        """Tokens available now (negative: in debt after an over-consumption)."""
        self._refill()
        return self._scaled / self._refill_ns

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._scaled = min(self._scaled + elapsed * self.size, self.size * self._refill_ns)

    def reduce(self, tokens: int) -> bool:
        """Take ``tokens``; ``False`` (and nothing taken) when they are not there. More than
        ``size`` tokens always pass and leave the bucket in debt (CH's over-consumption)."""
        if tokens <= 0:
            return True
        if self.one_time_burst:
            taken = min(self.one_time_burst, tokens)
            if taken == tokens:
                self.one_time_burst -= taken
                return True
            if not self._fits(tokens - taken):
                return False
            self.one_time_burst -= taken
            tokens -= taken
        elif not self._fits(tokens):
            return False
        self._scaled -= tokens * self._refill_ns
        return True

    def _fits(self, tokens: int) -> bool:
        self._refill()
        if self._scaled < 0:
            return False  # still repaying an over-consumption
        return tokens > self.size or self._scaled >= tokens * self._refill_ns

    def force(self, tokens: int) -> None:
        """Take ``tokens`` whatever the budget (work already done, such as a frame received)."""
        if tokens <= 0:
            return
        taken = min(self.one_time_burst, tokens)
        self.one_time_burst -= taken
        self._refill()
        self._scaled -= (tokens - taken) * self._refill_ns

    def replenish(self, tokens: int) -> None:
        """Give back ``tokens`` taken by a request that did not go ahead (never above ``size``)."""
        self._refill()
        self._scaled = min(self._scaled + tokens * self._refill_ns, self.size * self._refill_ns)

    def wait_ns(self, tokens: int) -> int:
        """Nanoseconds until ``tokens`` (at most ``size``) are available: 0 if they are now."""
        self._refill()
        needed = min(max(tokens, 0), self.size) * self._refill_ns - self._scaled
        if needed <= 0:
            return 0
        return -(-needed // self.size)  # ceil(needed / size)


class Timer(Protocol):
    """A one-shot timer the limiter arms when it blocks (:class:`TimerFd`, or a fake in tests)."""

    def arm(self, delay_ns: int) -> None:
        """Fire once, ``delay_ns`` (> 0) from now, replacing any earlier arming."""

    def close(self) -> None:
        """Release the timer."""


class RateLimiter:
    """A bandwidth and an ops bucket (either optional) shared by everyone who consumes from it.

    :param bandwidth: the bytes bucket, or ``None`` for no bandwidth limit.
    :param ops: the operations bucket, or ``None``.
    :param timer: armed when the limiter blocks (default: a new :class:`TimerFd`).
    :param name: for errors and counters.
    """

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None, *,
                 timer: Timer | None = None, name: str = "rate limiter") -> None:
        self.name = name
        self._buckets: dict[TokenKind, TokenBucket] = {}
        if bandwidth is not None:
            self._buckets[TokenKind.BYTES] = bandwidth
        if ops is not None:
            self._buckets[TokenKind.OPS] = ops
        self._timer: Timer | None = timer if timer is not None else TimerFd()  # at build time, not on a worker
        self._lock = threading.Lock()
        self._blocked = False
        self._listeners: list[Callable[[], None]] = []
        self._loop: EventLoop | None = None
        #: How often a request was refused (a queue stopped until the next refill).
        self.throttled = 0

    @classmethod
    def from_config(cls, config: RateLimiterConfig, *, clock: Clock = time.monotonic_ns,
                    timer: Timer | None = None, name: str = "rate limiter") -> RateLimiter:
        """Cloud Hypervisor's ``RateLimiterConfig`` (``bandwidth`` and ``ops`` token buckets)."""
        buckets = [None if b is None else TokenBucket(b.size, b.refill_time, b.one_time_burst or 0, clock=clock)
                   for b in (config.bandwidth, config.ops)]
        return cls(buckets[0], buckets[1], timer=timer, name=name)

    def bucket(self, kind: TokenKind) -> TokenBucket | None:
        return self._buckets.get(kind)

    @property
    def blocked(self) -> bool:
        """Whether consumption fails until the timer fires."""
        return self._blocked

    def consume(self, tokens: int, kind: TokenKind) -> bool:
        """Take ``tokens`` of ``kind``; ``False`` (nothing taken, the limiter blocked until its
        timer fires) when they are not there."""
        with self._lock:
            return self._consume({kind: tokens})

    def consume_request(self, nbytes: int) -> bool:
        """One operation of ``nbytes`` bytes, both or neither (CH's block device takes 1 op,
        then the bytes, and gives the op back when the bytes are refused)."""
        with self._lock:
            return self._consume({TokenKind.OPS: 1, TokenKind.BYTES: nbytes})

    def force(self, tokens: int, kind: TokenKind) -> None:
        """Take ``tokens`` of work already done; the limiter blocks if that leaves a debt."""
        with self._lock:
            bucket = self._buckets.get(kind)
            if bucket is None:
                return
            bucket.force(tokens)
            wait = bucket.wait_ns(0)
            if wait and not self._blocked:
                self._block(wait)

    def replenish(self, tokens: int, kind: TokenKind) -> None:
        """Give back ``tokens`` consumed for work that did not happen."""
        with self._lock:
            bucket = self._buckets.get(kind)
            if bucket is not None:
                bucket.replenish(tokens)

    def _consume(self, wanted: Mapping[TokenKind, int]) -> bool:
        if self._blocked:
            return False
        taken: list[tuple[TokenBucket, int]] = []
        for kind, tokens in wanted.items():
            bucket = self._buckets.get(kind)
            if bucket is None:
                continue
            if not bucket.reduce(tokens):
                for done, amount in taken:
                    done.replenish(amount)
                self.throttled += 1
                self._block(bucket.wait_ns(tokens))
                return False
            taken.append((bucket, tokens))
        return True

    def _block(self, wait_ns: int) -> None:
        self._blocked = True
        timer = self._timer
        if timer is None:
            timer = self._timer = TimerFd()
        timer.arm(min(max(wait_ns, MIN_WAIT_NS), MAX_WAIT_NS))

    # -- waking the users ---------------------------------------------------------------------

    def on_timer(self) -> None:
        """The timer fired: unblock and tell every listener to try again."""
        timer = self._timer
        if isinstance(timer, TimerFd):
            timer.acknowledge()
        with self._lock:
            self._blocked = False
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def subscribe(self, loop: EventLoop, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on ``loop``'s thread) whenever the limiter unblocks. The first
        subscriber puts the timer's fd on ``loop``; a limiter lives on one VM's loop."""
        with self._lock:
            if self._timer is None:
                self._timer = TimerFd()
            if self._loop is None and isinstance(self._timer, TimerFd):
                loop.add_reader(self._timer.fd, self.on_timer)
                self._loop = loop
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        """Forget ``listener``; the last one takes the timer off the loop."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            if not self._listeners:
                self._unwatch()

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and isinstance(self._timer, TimerFd):
            try:
                loop.remove_reader(self._timer.fd)
            except (OSError, ValueError):  # the loop is closed already
                pass

    def counters(self) -> dict[str, int]:
        return {"throttled": self.throttled}

    def close(self) -> None:
        with self._lock:
            self._unwatch()
            self._listeners.clear()
            if self._timer is not None:
                self._timer.close()
                self._timer = None


class RateLimitGroups:
    """The VM's rate-limit groups (``--rate-limit-group``): one :class:`RateLimiter` per group,
    shared by every disk that names it (CH's ``RateLimiterGroup``), made on first use."""

    def __init__(self, configs: Mapping[str, RateLimiterConfig]) -> None:
        self._configs = dict(configs)
        self._limiters: dict[str, RateLimiter] = {}
        self._lock = threading.Lock()

    def get(self, group_id: str) -> RateLimiter:
        """The group's limiter. :raises VmmError: no such group."""
        with self._lock:
            limiter = self._limiters.get(group_id)
            if limiter is None:
                config = self._configs.get(group_id)
                if config is None:
                    raise VmmError(f"no rate limit group {group_id!r} (groups: {', '.join(self._configs) or 'none'})")
                limiter = self._limiters[group_id] = RateLimiter.from_config(config, name=f"group {group_id}")
            return limiter

    def close(self) -> None:
        with self._lock:
            for limiter in self._limiters.values():
                limiter.close()
            self._limiters.clear()


# -- timerfd (Python 3.11 has no os.timerfd_create) ----------------------------------------------

_CLOCK_MONOTONIC: Final = 1
_TFD_NONBLOCK: Final = os.O_NONBLOCK
_TFD_CLOEXEC: Final = os.O_CLOEXEC


class TimerFd:
    """A one-shot ``timerfd`` on ``CLOCK_MONOTONIC`` (timerfd_create(2)), readable when it fires."""

    def __init__(self) -> None:
        import ctypes  # only for a VM with a rate limit

        self._ctypes = ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise VmmError(f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd

    def arm(self, delay_ns: int) -> None:
        ctypes = self._ctypes
        delay_ns = max(delay_ns, 1)  # an all-zero it_value would disarm the timer, never fire it
        spec = (ctypes.c_long * 4)(0, 0, delay_ns // 1_000_000_000, delay_ns % 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, 0, spec, None) < 0:
            raise VmmError(f"timerfd_settime: {os.strerror(ctypes.get_errno())}")

    def acknowledge(self) -> None:
        """Read the expiry count so the fd stops being readable."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, InterruptedError, OSError):
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
