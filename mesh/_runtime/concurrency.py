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

__all__ = ["ConcurrencyLimit", "ReplyCache", "cancel_and_wait"]

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
