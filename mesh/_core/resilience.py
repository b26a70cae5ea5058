"""Resilience primitives: backoff, retry budget, instance balancing, the reply cache.

Each takes an injectable clock (and random source) so tests need no sleeps. Pure core: no I/O.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from mesh.errors import InvalidArgument

__all__ = [
    "Backoff",
    "ConcurrencyLimit",
    "LeastLoadedPicker",
    "ReplyCache",
    "RetryBudget",
    "cancel_and_wait",
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
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
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


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None], timeout: float = 2.0) -> None:
    """Cancel background tasks and wait for them to end, within ``timeout``.

    A cancel can be lost on Python 3.11 when it races an ``asyncio.wait_for`` that completes at
    the same moment (nats-py's requests use one), leaving the task running: so cancel again
    until they end or the bound passes, rather than await them forever.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    pending = {t for t in tasks if t is not None and not t.done()}
    everything = set(pending)
    while pending:
        left = end - loop.time()
        if left <= 0:
            break
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=min(left, 0.2))
    for task in everything:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failed background task must not warn at exit


class ConcurrencyLimit:
    """At most ``limit`` holders at once; a free slot is taken without awaiting (the common
    case on the hot path), others wait in arrival order."""

    __slots__ = ("_waiters", "active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed over just as we were cancelled
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back, handing it straight to the next waiter."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes on; ``active`` is unchanged
                return
        self.active -= 1


class ReplyCache:
    """Recent replies by idempotency key, so a retried attempt is answered without re-running.

    An entry is a future: a retry that arrives while the first attempt still runs waits for its
    result instead of starting the handler again. Bounded by count and age.
    """

    def __init__(
        self, ttl: float = 120.0, max_entries: int = 10_000, *, clock: Clock = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[
            tuple[str, str, str], tuple[float, bytes, asyncio.Future[tuple[str, bytes]]]
        ] = OrderedDict()

    def _trim(self, now: float) -> None:
        entries = self._entries
        for _ in range(len(entries)):
            key, (born, _fp, fut) = next(iter(entries.items()))
            if not fut.done():
                # Still running: never evicted (a retry would run it twice); look past it.
                entries.move_to_end(key)
                continue
            if len(entries) >= self._max or born + self.ttl < now:
                entries.popitem(last=False)
            else:
                break

    def claim(
        self, key: tuple[str, str, str], fingerprint: bytes = b""
    ) -> tuple[bool, asyncio.Future[tuple[str, bytes]]]:
        """Look up or reserve ``key``.

        Args:
            key: ``(caller agent, endpoint, idempotency key)``.
            fingerprint: a hash of the request body; a key reused with another body is refused.

        Returns:
            ``(owner, future)``: ``owner`` is True when the caller must run the handler and
            resolve the future; otherwise the future holds (or will hold) the earlier reply.

        Raises:
            InvalidArgument: the key was used before for a different request body.
        """
        now = self._clock()
        self._trim(now)
        hit = self._entries.get(key)
        if hit is not None and (hit[0] + self.ttl >= now or not hit[2].done()):
            if hit[1] != fingerprint:
                raise InvalidArgument(
                    f"idempotency key {key[2]!r} was already used for a different request"
                )
            return False, hit[2]
        fut: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now, fingerprint, fut)
        return True, fut

    def forget(self, key: tuple[str, str, str]) -> None:
        """Drop a reservation whose attempt failed before producing a reply worth keeping."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
