"""Load shedding on a real nats-server: a bounded queue per endpoint (policy ``max_queue``)
answers the overflow at once with RESOURCE_EXHAUSTED and a retry-after, fairly per caller."""

from __future__ import annotations

import asyncio
import gc
import time

from pydantic import BaseModel

import mesh
from mesh._core.policy import PolicyEngine
from mesh.testing import NatsServer, Trust, test_config, wait_until

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: shedding}
spec:
  defaults: {authorization: allow}
  endpoints:
    worker.slow: {max_queue: 5}
"""


class Job(BaseModel):
    n: int


def make_worker(seconds: float) -> mesh.Agent:
    agent = mesh.Agent("worker")

    @agent.endpoint(concurrency=1)
    async def slow(job: Job) -> Job:
        await asyncio.sleep(seconds)
        return job

    return agent


async def _timed(caller: mesh.Mesh, n: int) -> tuple[float, Job | mesh.MeshError]:
    start = time.perf_counter()
    try:
        result: Job | mesh.MeshError = await caller.request(
            "worker", "slow", Job(n=n), Job, timeout=20
        )
    except mesh.MeshError as exc:
        result = exc
    return time.perf_counter() - start, result


async def test_overflow_is_shed_at_once_with_a_retry_after(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Concurrency 1, max_queue 5, 50 calls at once: 6 are served, 44 are refused with
    RESOURCE_EXHAUSTED and a retry-after within a fraction of a second, and the queue empties."""
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=make_worker(0.5)) as worker,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        worker.governance.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
        await alice.wait_for("worker")
        results = await asyncio.gather(*(_timed(alice, i) for i in range(50)))
        served = [r for _t, r in results if isinstance(r, Job)]
        shed = [(t, r) for t, r in results if isinstance(r, mesh.ResourceExhausted)]
        assert len(served) == 6 and len(shed) == 44, results
        for elapsed, exc in shed:
            assert elapsed < 0.5, elapsed  # answered at once, not at the 20 s deadline
            assert exc.retry_after is not None and 0.01 <= exc.retry_after <= 5.0
        assert sorted(t for t, _ in shed)[len(shed) // 2] < 0.1  # the median: well under
        assert worker.server is not None
        limit = worker.server._limits["slow"]
        await wait_until(lambda: limit.active == 0)
        assert limit.queued == 0 and limit._queued == {}


async def test_a_noisy_caller_does_not_shed_a_quiet_callers_call(
    nats_server: NatsServer, trust: Trust
) -> None:
    """With the queue full of one caller's requests, another caller's single call is queued
    (one of the noisy caller's is shed instead) and served."""
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=make_worker(0.2)) as worker,
        mesh.Mesh(trust.identity("noisy"), cfg) as noisy,
        mesh.Mesh(trust.identity("quiet"), cfg) as quiet,
    ):
        worker.governance.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
        await noisy.wait_for("worker")
        await quiet.wait_for("worker")
        assert worker.server is not None
        limit = worker.server._limits["slow"]
        flood = [asyncio.create_task(_timed(noisy, i)) for i in range(20)]
        await wait_until(lambda: limit.queued == 5)
        _elapsed, mine = await _timed(quiet, 99)
        assert mine == Job(n=99)
        noisy_results = [r for _t, r in await asyncio.gather(*flood)]
        assert sum(isinstance(r, mesh.ResourceExhausted) for r in noisy_results) >= 14
        await wait_until(lambda: limit.active == 0)
        assert limit.queued == 0


async def test_max_queue_zero_serves_only_free_slots(nats_server: NatsServer, trust: Trust) -> None:
    """With no queue, a call that finds the slot taken is refused at once."""
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    policy = POLICY.replace("max_queue: 5", "max_queue: 0")
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=make_worker(0.3)) as worker,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        worker.governance.engine = PolicyEngine(mesh.parse_policy(policy), revision=1)
        await alice.wait_for("worker")
        results = await asyncio.gather(*(_timed(alice, i) for i in range(3)))
        assert sum(isinstance(r, Job) for _t, r in results) == 1
        assert sum(isinstance(r, mesh.ResourceExhausted) for _t, r in results) == 2


RATE_POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: shared-total}
spec:
  defaults: {authorization: allow}
  endpoints:
    worker.fast: {rate_limit: {total: 20/s}}
"""


async def test_a_shared_total_keeps_a_quiet_callers_calls_while_another_floods(
    nats_server: NatsServer, trust: Trust
) -> None:
    """20/s shared: a noisy caller sends ~150/s for 3 s, a quiet one 4/s (within its fair
    share of 10/s): every quiet call after its first second is served, the noisy caller gets
    the rest, and the endpoint never serves more than the total allows."""
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    agent = mesh.Agent("worker")
    served_at: list[float] = []

    @agent.endpoint()
    async def fast(job: Job) -> Job:
        served_at.append(time.monotonic())
        return job

    async def call(caller: mesh.Mesh, n: int) -> tuple[float, bool]:
        start = time.monotonic()
        try:
            await caller.request("worker", "fast", Job(n=n), Job, timeout=5)
            return start, True
        except mesh.ResourceExhausted:
            return start, False

    async def send(caller: mesh.Mesh, rate: float, seconds: float) -> list[tuple[float, bool]]:
        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(call(caller, len(tasks))))
            await asyncio.sleep(1 / rate)
        return list(await asyncio.gather(*tasks))

    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=agent) as worker,
        mesh.Mesh(trust.identity("noisy"), cfg) as noisy,
        mesh.Mesh(trust.identity("quiet"), cfg) as quiet,
    ):
        worker.governance.engine = PolicyEngine(mesh.parse_policy(RATE_POLICY), revision=1)
        await noisy.wait_for("worker")
        await quiet.wait_for("worker")
        began = time.monotonic()
        loud, calm = await asyncio.gather(send(noisy, 150, 3.0), send(quiet, 4, 3.0))
    late = [ok for start, ok in calm if start - began > 1.0]
    assert late and all(late), calm
    assert sum(ok for _, ok in loud) >= 20, "the noisy caller gets what the quiet one leaves"
    assert len(served_at) <= 20 + 20 * (served_at[-1] - served_at[0]) + 1


async def test_a_flood_of_2000_is_refused_at_once_past_the_bound_and_leaves_nothing(
    nats_server: NatsServer, trust: Trust
) -> None:
    """2,000 calls at once (10 s deadlines) against concurrency 1 and max_queue 100: those
    within the bound are served (and a few more as slots free up), the rest refused with
    RESOURCE_EXHAUSTED at once, and once the calls' deadline has passed the queue and the
    objects both processes hold are back to where they were (within 500 objects: one kept per
    call would be 2,000). Until that deadline a refused call's objects are still held (about
    23 each: noted in docs/operations.md)."""
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    policy = POLICY.replace("max_queue: 5", "max_queue: 100")

    async def call(n: int) -> tuple[float, Job | mesh.MeshError]:
        start = time.perf_counter()
        try:
            result: Job | mesh.MeshError = await alice.request(
                "worker", "slow", Job(n=n), Job, timeout=10
            )
        except mesh.MeshError as exc:
            result = exc
        return time.perf_counter() - start, result

    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=make_worker(0.002)) as worker,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        worker.governance.engine = PolicyEngine(mesh.parse_policy(policy), revision=1)
        await alice.wait_for("worker")
        assert worker.server is not None
        limit = worker.server._limits["slow"]
        await asyncio.gather(*(call(i) for i in range(200)))  # warm every cache
        await asyncio.sleep(10.5)
        gc.collect()
        before = len(gc.get_objects())
        began = time.monotonic()
        results = await asyncio.gather(*(call(i) for i in range(2000)))
        await wait_until(lambda: limit.active == 0 and limit.queued == 0)
        served = sum(isinstance(r, Job) for _t, r in results)
        others = [r for _t, r in results if not isinstance(r, Job | mesh.ResourceExhausted)]
        shed = sorted(t for t, r in results if isinstance(r, mesh.ResourceExhausted))
        del results[:]  # what the test itself keeps is not the mesh's
        await asyncio.sleep(max(0.0, began + 10.5 - time.monotonic()))
        gc.collect()
        after = len(gc.get_objects())
        assert others == [] and served + len(shed) == 2000
        assert 101 <= served < 400, served  # the bound, and those freed slots let in meanwhile
        # The median refusal, against the 10 s deadline: a second or two while 2,000 calls
        # are sealed, sent and refused on 2 cores (more under coverage), not the deadline.
        assert shed[len(shed) // 2] < 3.0, "refused at once, not at the deadline"
        assert limit._queued == {}
        assert after - before < 500, f"{after - before} more objects held than before"
