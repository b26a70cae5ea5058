"""Resilience primitives: backoff, retry budget and instance balancing.

Each takes an injectable clock (and random source) so tests need no sleeps. Pure core: no I/O.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = [
    "Backoff",
    "LeastLoadedPicker",
    "RetryBudget",
    "two_choices",
]

Clock = Callable[[], float]
T = TypeVar("T")
C = TypeVar("C")


class Backoff:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**retry))`` (Envoy).

    Args:
        base: seconds before the first retry's upper bound doubles (default 25 ms).
        cap: the largest upper bound (default 250 ms).
    """

    def __init__(
        self, base: float = 0.025, cap: float = 0.250, *, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        upper = min(self.cap, self.base * (2.0 ** min(max(0, retry - 1), 64)))
        return self._rng.uniform(0.0, upper)


class RetryBudget:
    """Limits retries to ``ratio`` of requests plus ``min_per_s`` per second over ``ttl`` (Linkerd).

    Args:
        ratio: fraction of requests that may be retried (default 0.2).
        min_per_s: retries per second always allowed (default 10).
        ttl: the sliding window in seconds (default 10).
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        ttl: float = 10.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.ttl = ttl
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.ttl
        for q in (self._requests, self._retries):
            while q and q[0] <= edge:
                q.popleft()

    def record_request(self) -> None:
        """Count one original request (not a retry)."""
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget; ``False`` when the budget is used up."""
        now = self._clock()
        self._trim(now)
        allowed = self.ratio * len(self._requests) + self.min_per_s * self.ttl
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


def two_choices(rng: random.Random, candidates: Sequence[C]) -> tuple[C, C]:
    """Two different candidates drawn at random, for the power of two choices (at least two
    candidates)."""
    n = len(candidates)
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    return candidates[i], candidates[j]


class LeastLoadedPicker(Generic[T]):
    """Power of two choices on outstanding requests: sample two, take the less loaded.

    Outstanding counts are kept per key by ``acquire``/``release``; a penalty (for example after
    RESOURCE_EXHAUSTED) adds phantom load for a while so a fast-failing instance does not
    attract traffic.
    """

    def __init__(self, *, rng: random.Random | None = None, clock: Clock = time.monotonic) -> None:
        self._rng = rng or random.Random()
        self._clock = clock
        self.outstanding: dict[T, int] = {}
        self._penalty_until: dict[T, float] = {}

    def _load(self, key: T, now: float) -> float:
        load = float(self.outstanding.get(key, 0))
        until = self._penalty_until.get(key)
        if until is not None:
            if until > now:
                load += 1000.0
            else:
                del self._penalty_until[key]
        return load

    def pick(self, candidates: Sequence[C], key: Callable[[C], T] | None = None) -> C:
        """Choose one of ``candidates`` (must not be empty).

        Args:
            candidates: what to choose from.
            key: maps a candidate to the key its load is kept under (default: itself).
        """
        if len(candidates) == 1:
            return candidates[0]
        a, b = two_choices(self._rng, candidates)
        ka, kb = (a, b) if key is None else (key(a), key(b))
        now = self._clock()
        return a if self._load(ka, now) <= self._load(kb, now) else b  # type: ignore[arg-type]

    def acquire(self, key: T) -> None:
        self.outstanding[key] = self.outstanding.get(key, 0) + 1

    def release(self, key: T) -> None:
        left = self.outstanding.get(key, 0) - 1
        if left > 0:
            self.outstanding[key] = left
        else:
            self.outstanding.pop(key, None)

    def penalize(self, key: T, seconds: float) -> None:
        """Make ``key`` look heavily loaded for ``seconds``."""
        self._penalty_until[key] = self._clock() + seconds
