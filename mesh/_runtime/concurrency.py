"""Concurrency primitives of the runtime: endpoint concurrency limits, the reply cache that
makes keyed calls run at most once, and bounded cancellation of background tasks.

They hold asyncio futures, so they live in the runtime rather than in the pure core.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from mesh.errors import InvalidArgument

__all__ = ["DEFAULT_MAX_QUEUE", "ConcurrencyLimit", "ReplyCache", "cancel_and_wait"]

Clock = Callable[[], float]


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


DEFAULT_MAX_QUEUE = 1024
"""Requests one endpoint queues for a slot when policy sets no ``max_queue``: Envoy's
``max_pending_requests`` default, a safety net rather than a tuned bound."""

# The retry-after a shed caller is given: the expected time for the queue to drain, bounded.
RETRY_AFTER_MIN = 0.010
RETRY_AFTER_MAX = 5.0
_FALLBACK_INTERVAL = 0.100  # seconds per freed slot before any handoff has been timed
_EWMA = 0.2


class _Waiter:
    __slots__ = ("caller", "fut")

    def __init__(self, fut: asyncio.Future[bool], caller: str) -> None:
        self.fut = fut
        self.caller = caller


class ConcurrencyLimit:
    """At most ``limit`` holders at once; a free slot is taken without awaiting (the common
    case on the hot path), others wait in arrival order in a queue of bounded length.

    Load shedding: a waiter that would make the queue longer than ``max_queue`` is refused at
    once, so an overloaded endpoint answers in microseconds rather than at every caller's
    deadline. The queue is shared fairly: while it is full, a caller holding less than its
    share (``max(1, max_queue // callers queued)``) still gets in, pushing out the newest waiter
    of the caller holding the most, if that one is over its share.
    """

    __slots__ = ("_clock", "_interval", "_mark", "_queued", "_waiters", "active", "limit")

    def __init__(self, limit: int, *, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[_Waiter] = deque()
        self._queued: dict[str, int] = {}  # waiters per caller; no entry at zero
        self._clock = clock
        # Seconds between slots freed while someone waits (a moving average): the time one
        # queue place takes to drain, i.e. mean service time / limit under saturation.
        self._interval = _FALLBACK_INTERVAL
        self._mark = 0.0  # when the last slot was handed over, or the queue last became busy

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def queued_by(self, caller: str) -> int:
        """Requests of ``caller`` waiting for a slot."""
        return self._queued.get(caller, 0)

    def retry_after(self) -> float:
        """When a shed caller may try again: the queue's expected drain time, bounded to
        ``[RETRY_AFTER_MIN, RETRY_AFTER_MAX]`` seconds."""
        wait = (len(self._waiters) + 1) * self._interval
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, wait))

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self, caller: str = "", max_queue: int | None = None) -> bool:
        """Wait for a slot.

        Args:
            caller: who asks (the calling agent), for the fair share of the queue.
            max_queue: the most requests that may wait; ``None``: unbounded.

        Returns:
            True once the slot is held; False when the request is shed (the queue is full, or
            a caller within its share pushed this one out): it holds nothing.
        """
        if self.try_acquire():
            return True
        full = max_queue is not None and len(self._waiters) >= max_queue
        if full and not self._push_out(caller, max_queue or 0):
            return False
        waiter = _Waiter(asyncio.get_running_loop().create_future(), caller)
        if not self._waiters:
            self._mark = self._clock()
        self._waiters.append(waiter)
        self._queued[caller] = self._queued.get(caller, 0) + 1
        try:
            return await waiter.fut
        except asyncio.CancelledError:
            fut = waiter.fut
            if fut.done() and not fut.cancelled():
                if fut.result():
                    self.release()  # a slot was handed over just as we were cancelled
            else:
                self._drop(waiter)
            raise

    def _push_out(self, caller: str, max_queue: int) -> bool:
        """Make room in a full queue for ``caller`` if it is within its share, by shedding the
        newest waiter of the heaviest caller when that one is over its share."""
        queued = self._queued
        mine = queued.get(caller, 0)
        share = max(1, max_queue // (len(queued) + (0 if mine else 1)))
        if mine >= share or not queued:
            return False
        heavy = max(queued, key=queued.__getitem__)
        if queued[heavy] <= share:
            return False
        for waiter in reversed(self._waiters):
            if waiter.caller == heavy and not waiter.fut.done():
                self._drop(waiter)
                waiter.fut.set_result(False)
                return True
        return False  # pragma: no cover - the count says there is one

    def _drop(self, waiter: _Waiter) -> None:
        """Take a waiter out of the queue (if it is still there) and out of its count."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return  # already taken out by ``release``
        self._uncount(waiter.caller)

    def _uncount(self, caller: str) -> None:
        left = self._queued[caller] - 1
        if left:
            self._queued[caller] = left
        else:
            del self._queued[caller]

    def release(self) -> None:
        """Give a slot back, handing it straight to the next waiter."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            self._uncount(waiter.caller)
            if not waiter.fut.done():
                waiter.fut.set_result(True)  # the slot passes on; ``active`` is unchanged
                now = self._clock()
                self._interval += _EWMA * (now - self._mark - self._interval)
                self._mark = now
                return
        self.active -= 1


class ReplyCache:
    """Recent replies by idempotency key, so a retried attempt is answered without re-running.

    An entry is a future: a retry that arrives while the first attempt still runs waits for its
    result instead of starting the handler again, however long it runs. Bounded by count and
    by age, counted from when the reply was made.
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
        fut.add_done_callback(lambda _f: self._finished(key, fut))
        return True, fut

    def _finished(self, key: tuple[str, str, str], fut: asyncio.Future[tuple[str, bytes]]) -> None:
        """The reply is kept ``ttl`` from when it was made, not from when the call began: a
        call that ran for hours is answered from here for as long as a short one."""
        entry = self._entries.get(key)
        if entry is not None and entry[2] is fut:
            self._entries[key] = (self._clock(), entry[1], fut)
            self._entries.move_to_end(key)

    def forget(self, key: tuple[str, str, str]) -> None:
        """Drop a reservation whose attempt failed before producing a reply worth keeping."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
