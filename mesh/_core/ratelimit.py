"""Token buckets and the callee's rate limiter (per (caller, endpoint) and per endpoint).

Pure core: no I/O, an injectable clock, no sleeps in tests.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from mesh._core.policy import RateLimitSpec
from mesh.errors import InvalidArgument

__all__ = ["RateLimiter", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate`` tokens per second; starts full.

    Over any window of ``w`` seconds at most ``burst + rate * w`` tokens can be taken.

    Args:
        rate: tokens per second (> 0).
        burst: capacity (>= 1).
        clock: monotonic seconds.

    Raises:
        InvalidArgument: a rate or burst out of range.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise InvalidArgument(f"token bucket rate must be > 0, got {rate!r}")
        if burst < 1:
            raise InvalidArgument(f"token bucket burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> float:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:  # a clock that steps back refills nothing
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._last = now
        return self._tokens

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional while refilling)."""
        return self._refill()

    def available(self) -> bool:
        """Whether a token could be taken now; takes nothing."""
        return self._refill() >= 1.0

    def try_take(self) -> bool:
        """Take one token; ``False`` (taking nothing) when the bucket is empty."""
        if self._refill() >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until one token is available (0.0 when one is now)."""
        tokens = self._refill()
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


BucketKey = tuple[str, str, str, str]


class RateLimiter:
    """The callee's token buckets: one per (caller, agent, endpoint) for ``per_caller`` and one
    per (agent, endpoint) for ``total``, made on first use and bounded in number (the least
    recently used bucket is dropped first; a dropped bucket comes back full).

    Two steps, on purpose. The callee calls ``check`` before decrypting a request (a cheap
    rejection that consumes nothing) and ``take`` only after the seal verified. The caller
    identity in a frame is only a claim until the seal is opened: a forger who attaches a
    victim's public certificate to junk frames would otherwise drain the victim's per-caller
    budget (and the endpoint's total) without holding its keys. Peeking first keeps rejection
    cheap under load; taking after verification means only authenticated requests spend tokens.

    When the policy's limit for a key changes (another rate or burst), that bucket is re-created,
    full, with the new settings.

    Args:
        clock: monotonic seconds.
        max_buckets: the most buckets kept.
    """

    def __init__(self, *, clock: Clock = time.monotonic, max_buckets: int = 10_000) -> None:
        if max_buckets < 2:
            raise InvalidArgument(f"max_buckets must be >= 2, got {max_buckets!r}")
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[BucketKey, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _keys(
        self, caller: str, agent: str, endpoint: str, limit: RateLimitSpec
    ) -> list[tuple[BucketKey, float, int]]:
        out: list[tuple[BucketKey, float, int]] = []
        if limit.per_caller is not None:
            out.append((("caller", caller, agent, endpoint), limit.per_caller, limit.caller_burst))
        if limit.total is not None:
            out.append((("total", "", agent, endpoint), limit.total, limit.total_capacity))
        return out

    def _existing(self, key: BucketKey, rate: float, burst: int) -> TokenBucket | None:
        """The live bucket for ``key`` if it has these settings (``None``: missing or stale,
        which means it would start full)."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            return None
        return bucket

    def check(
        self, caller: str, agent: str, endpoint: str, limit: RateLimitSpec | None
    ) -> float | None:
        """Whether a request would pass, consuming nothing and creating no bucket.

        Returns:
            ``None`` when both buckets have a token (or there is no limit), else the seconds
            until both will.
        """
        if limit is None:
            return None
        wait = 0.0
        for key, rate, burst in self._keys(caller, agent, endpoint, limit):
            bucket = self._existing(key, rate, burst)
            if bucket is not None:
                wait = max(wait, bucket.retry_after())
        return wait if wait > 0 else None

    def take(
        self, caller: str, agent: str, endpoint: str, limit: RateLimitSpec | None
    ) -> float | None:
        """Take one token from the per-caller and the total bucket, or from neither.

        Returns:
            ``None`` when the tokens were taken (or there is no limit), else the seconds until
            both buckets have a token (nothing is taken).
        """
        if limit is None:
            return None
        buckets: list[TokenBucket] = []
        wait = 0.0
        for key, rate, burst in self._keys(caller, agent, endpoint, limit):
            bucket = self._existing(key, rate, burst)
            if bucket is None:
                bucket = TokenBucket(rate, burst, clock=self._clock)
                self._buckets[key] = bucket
                while len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(key)
            buckets.append(bucket)
            wait = max(wait, bucket.retry_after())
        if wait > 0:
            return wait
        for bucket in buckets:
            bucket.try_take()
        return None
