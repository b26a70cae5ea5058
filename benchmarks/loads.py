"""The measurement loops: requests with N in flight (N=1 is the sequential case) and events.

Every loop runs for a fixed time after a warm-up of the same shape, and stops by itself.
"""

from __future__ import annotations

import asyncio
import gc
import time

from .stats import summarize_ns
from .systems import Call, Sink

__all__ = ["events", "requests"]

EVENT_WINDOW = 1024
"""Events a publisher may have outstanding (published, not yet seen by the subscriber)."""

STALL_TIMEOUT = 10.0


async def _run_requests(call: Call, in_flight: int, seconds: float) -> list[int]:
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    stop_ns = clock() + int(seconds * 1e9)

    async def worker() -> None:
        while True:
            t0 = clock()
            await call()
            t1 = clock()
            if t1 > stop_ns:
                return
            record(t1 - t0)

    try:
        async with asyncio.TaskGroup() as tg:  # one failure cancels the other callers
            for _ in range(in_flight):
                tg.create_task(worker())
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return latencies


async def requests(
    call: Call, *, in_flight: int, seconds: float, warmup: float
) -> dict[str, float]:
    """Throughput (completed per second) and latency percentiles with ``in_flight`` callers,
    each calling again as soon as its previous call returned."""
    await _run_requests(call, in_flight, warmup)
    gc.collect()
    latencies = await _run_requests(call, in_flight, seconds)
    if not latencies:
        raise RuntimeError("no request completed")
    return {"throughput_per_s": len(latencies) / seconds, **summarize_ns(latencies)}


async def _run_events(publish: Call, sink: Sink, seconds: float) -> int:
    sink.reset()
    sent = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        if sent - sink.count >= EVENT_WINDOW:
            await sink.wait_count(sent - EVENT_WINDOW // 2, STALL_TIMEOUT)
        await publish()
        sent += 1
    try:
        await sink.wait_count(sent, STALL_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(f"subscriber stalled: {sink.count} of {sent} events arrived") from None
    return sent


async def events(publish: Call, sink: Sink, *, seconds: float, warmup: float) -> dict[str, float]:
    """Events per second seen by one subscriber, from its first to its last event, while a
    publisher keeps at most ``EVENT_WINDOW`` events outstanding."""
    await _run_events(publish, sink, warmup)
    gc.collect()
    await _run_events(publish, sink, seconds)
    span = (sink.last_ns - sink.first_ns) / 1e9
    if sink.count < 2 or span <= 0:
        raise RuntimeError("too few events arrived to measure a rate")
    return {"throughput_per_s": (sink.count - 1) / span, "samples": float(sink.count)}
