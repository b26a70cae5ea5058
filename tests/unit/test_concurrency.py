"""The endpoint concurrency limit: free slots, the bounded queue, load shedding and fairness."""

from __future__ import annotations

import asyncio

import pytest

from mesh._runtime.concurrency import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    ConcurrencyLimit,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _queue(limit: ConcurrencyLimit, caller: str, max_queue: int) -> asyncio.Task[bool]:
    """Start a waiter and let it reach the queue (or be shed)."""
    task = asyncio.create_task(limit.acquire(caller, max_queue))
    await asyncio.sleep(0)
    return task


def test_a_free_slot_is_taken_without_waiting() -> None:
    """try_acquire takes free slots up to the limit, then refuses."""
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    assert limit.active == 2


async def test_a_full_queue_sheds_at_once() -> None:
    """Past max_queue waiters, acquire returns False without waiting."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    waiting = [await _queue(limit, "a", 3) for _ in range(3)]
    assert limit.queued == 3
    assert await limit.acquire("a", 3) is False
    assert limit.queued == 3 and not any(t.done() for t in waiting)
    for _ in range(4):
        limit.release()
    assert [await t for t in waiting] == [True, True, True]
    assert limit.queued == 0 and limit.active == 0


async def test_max_queue_zero_means_no_queue() -> None:
    """With max_queue 0 a request either takes a free slot or is shed."""
    limit = ConcurrencyLimit(1)
    assert await limit.acquire("a", 0) is True
    assert await limit.acquire("a", 0) is False
    limit.release()
    assert limit.active == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    """Released slots pass to waiters first come, first served."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        assert await limit.acquire("a", 10)
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        limit.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_a_quiet_caller_pushes_out_a_noisy_one_from_a_full_queue() -> None:
    """A caller within its share gets in; the noisy caller's newest waiter is shed."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    noisy = [await _queue(limit, "noisy", 4) for _ in range(4)]
    quiet = await _queue(limit, "quiet", 4)
    await asyncio.sleep(0)
    assert not quiet.done()
    assert noisy[-1].done() and noisy[-1].result() is False
    assert limit.queued == 4
    assert limit.queued_by("noisy") == 3 and limit.queued_by("quiet") == 1
    limit.release()
    limit.release()
    limit.release()
    limit.release()
    assert [await t for t in (*noisy[:3], quiet)] == [True, True, True, True]


async def test_a_caller_over_its_share_is_shed_from_a_full_queue() -> None:
    """Once callers hold their shares, the noisy one's further requests are shed."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    for _ in range(4):
        await _queue(limit, "noisy", 4)
    await _queue(limit, "quiet", 4)
    await _queue(limit, "quiet", 4)  # share of 2 callers in 4 places: 2 each
    assert limit.queued_by("noisy") == 2 and limit.queued_by("quiet") == 2
    assert await limit.acquire("noisy", 4) is False
    assert await limit.acquire("quiet", 4) is False  # at its share too
    assert limit.queued == 4


async def test_a_lone_caller_may_fill_the_whole_queue() -> None:
    """The share is divided among callers present: alone, a caller has every place."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    for _ in range(5):
        await _queue(limit, "a", 5)
    assert limit.queued_by("a") == 5


async def test_a_cancelled_waiter_leaves_the_queue_and_its_count() -> None:
    """Cancelling a waiter (its deadline) frees its place; no per-caller entry lingers."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    task = await _queue(limit, "a", 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limit.queued == 0 and limit.queued_by("a") == 0
    limit.release()
    assert limit.active == 0


async def test_a_timed_out_waiter_does_not_keep_a_slot() -> None:
    """wait_for on a queued acquire that times out leaves the limit as it was."""
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limit.acquire("a", 5), 0.01)
    limit.release()
    assert limit.active == 0 and limit.queued == 0


async def test_retry_after_estimates_the_drain_time_within_bounds() -> None:
    """The retry-after is queue length times the time one slot takes to free, bounded."""
    clock = FakeClock()
    limit = ConcurrencyLimit(1, clock=clock)
    assert limit.try_acquire()
    tasks = [await _queue(limit, "a", 100) for _ in range(40)]
    for _ in range(30):  # slots free every 0.5 s: the moving average converges on it
        clock.now += 0.5
        limit.release()
    assert limit.queued == 10
    assert limit.retry_after() == RETRY_AFTER_MAX  # 11 x 0.5 s is past the bound
    for _ in range(11):
        clock.now += 0.0001
        limit.release()
    assert limit.queued == 0
    assert limit.retry_after() >= RETRY_AFTER_MIN
    await asyncio.gather(*tasks)
    assert limit.active == 0


async def test_retry_after_scales_with_the_queue() -> None:
    """A short queue on a fast endpoint asks for a short wait."""
    clock = FakeClock()
    limit = ConcurrencyLimit(1, clock=clock)
    assert limit.try_acquire()
    tasks = [await _queue(limit, "a", 100) for _ in range(25)]
    for _ in range(20):
        clock.now += 0.02
        limit.release()
    assert limit.queued == 5
    assert limit.retry_after() == pytest.approx(6 * 0.02, rel=0.05)
    for _ in range(6):
        limit.release()
    await asyncio.gather(*tasks)
