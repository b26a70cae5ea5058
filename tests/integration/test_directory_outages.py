"""The data plane through directory and broker outages, against real nats-servers.

- a KV watch that stalls (its consumer deleted: the watch falls silent, no error) keeps the
  last-known instances, which stay alive on their signed beats, and is re-created;
- the cluster node leading the directory stream is killed under keyed idempotent load;
- a single server is SIGKILLed and restarted on the same port under keyed load.

Timing assertions are generous; ``python -m benchmarks.reliability`` measures the real numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import nats
from pydantic import BaseModel

import mesh
from mesh._transport.nats import NatsTransport
from mesh.testing import NatsCluster, NatsServer, Trust, test_config, wait_until

DIRECTORY_STREAM = "KV_mesh-directory"


class Job(BaseModel):
    n: int
    work_ms: int = 20


class Done(BaseModel):
    n: int
    instance: str


def worker() -> mesh.Agent:
    agent = mesh.Agent("worker")

    @agent.endpoint(idempotent=True, concurrency=256)
    async def work(job: Job, ctx: mesh.Context) -> Done:
        await asyncio.sleep(job.work_ms / 1000)
        return Done(n=job.n, instance=ctx.mesh.instance)

    return agent


@dataclass
class Load:
    """What a steady keyed load saw: completion times of the OK answers, and failures."""

    sent: int = 0
    ok: list[tuple[float, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def max_gap(self, start: float, end: float) -> float:
        times = [start, *sorted(t for t, _ in self.ok if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


async def steady_load(
    caller: mesh.Mesh, rate: float, seconds: float, *, timeout: float = 10.0
) -> Load:
    load = Load()

    async def one(i: int) -> None:
        try:
            reply = await caller.request(
                "worker", "work", Job(n=i), Done, timeout=timeout, idempotency_key=f"k{i}"
            )
        except mesh.MeshError as exc:
            load.failed.append(f"{type(exc).__name__}: {exc}")
        else:
            assert reply.n == i
            load.ok.append((time.monotonic(), reply.instance))

    tasks = []
    start = time.monotonic()
    while (now := time.monotonic()) < start + seconds:
        target = start + load.sent / rate
        if target > now:
            await asyncio.sleep(target - now)
        tasks.append(asyncio.create_task(one(load.sent)))
        load.sent += 1
    await asyncio.gather(*tasks)
    return load


def pinned(urls: list[str], first: int) -> NatsTransport:
    """A connection that prefers node ``first`` and fails over to the others in order."""
    return NatsTransport(urls[first:] + urls[:first], options={"dont_randomize": True})


async def delete_consumers(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        consumers = await js.consumers_info(stream)
        for c in consumers:
            await js.delete_consumer(stream, c.name)
        return len(consumers)
    finally:
        await nc.close()


async def test_a_stalled_watch_keeps_the_last_known_instances_and_is_recreated(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Deleting the watch's consumer silences it without an error. The instance stays listed
    the whole time on its signed beats, calls keep working, the watch is re-created, and an
    instance started afterwards is found through the new watch."""
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=worker()),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("worker")
        assert await delete_consumers(nats_server.url, DIRECTORY_STREAM) >= 1

        end = time.monotonic() + 4 * cfg.directory.ttl
        while time.monotonic() < end:
            assert alice.directory.instances("worker"), "the last-known instance was dropped"
            await alice.request("worker", "work", Job(n=1, work_ms=0), Done, timeout=5)
            await asyncio.sleep(0.05)
        assert alice.directory.watch_restarts["stalled"] >= 1

        async with mesh.Mesh(trust.identity("worker"), cfg, agent=worker()) as late:
            await wait_until(
                lambda: alice.directory.get(f"worker.{late.instance}") is not None, timeout=10
            )


async def directory_leader(url: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(DIRECTORY_STREAM)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


async def test_killing_the_directory_leader_loses_no_keyed_request(
    nats_cluster: NatsCluster, trust: Trust
) -> None:
    """The caller and one of two instances are connected to the node leading the directory
    stream, which is SIGKILLed under steady keyed load: every request is answered, and the
    answers never stop for long (the directory lives on beats while JetStream elects a
    leader; attempts lost with the node are retried after the reconnect)."""
    urls = nats_cluster.urls
    cfg = test_config(urls)
    async with mesh.Mesh(trust.identity("worker"), cfg, agent=worker(), transport=pinned(urls, 0)):
        leader = await directory_leader(urls[0])
        at = next(i for i, n in enumerate(nats_cluster.nodes) if repr(n).find(leader) > 0)
        other = (at + 1) % 3
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker(), transport=pinned(urls, at)),
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker(), transport=pinned(urls, other)),
            mesh.Mesh(trust.identity("alice"), cfg, transport=pinned(urls, at)) as alice,
        ):
            await wait_until(lambda: len(alice.directory.instances("worker")) == 3, timeout=20)
            load = asyncio.create_task(steady_load(alice, rate=100, seconds=8.0))
            await asyncio.sleep(2.0)
            killed = time.monotonic()
            await nats_cluster.nodes[at].kill()
            result = await load
    assert result.failed == [], result.failed[:5]
    assert len(result.ok) == result.sent
    gap = result.max_gap(killed - 1.0, killed + 5.0)
    assert gap < 5.0, f"no answer for {gap:.2f} s after the kill"


async def test_a_broker_restart_loses_no_keyed_request(trust: Trust) -> None:
    """One server, SIGKILLed under keyed load and restarted on the same port 3 s later: with
    10 s deadlines every request is answered (the attempts in flight at the kill are retried
    after the reconnect), and both instances take calls again soon after the restart (fresh
    signed beats lift the "no responders" penalty: nobody is set aside for 8 s)."""
    server = NatsServer()
    await server.start()
    try:
        cfg = test_config([server.url])
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker()),
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker()),
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await wait_until(lambda: len(alice.directory.instances("worker")) == 2, timeout=20)
            load = asyncio.create_task(steady_load(alice, rate=100, seconds=10.0))
            await asyncio.sleep(2.0)
            await server.kill()
            await asyncio.sleep(3.0)
            await server.start()
            back = time.monotonic()
            result = await load
            retried = alice.stats.fates.get("ok_after_retry", 0)
    finally:
        await server.stop()
    assert result.failed == [], result.failed[:5]
    assert len(result.ok) == result.sent
    assert retried >= 1, "attempts in flight at the kill were retried after the reconnect"
    later = {instance for t, instance in result.ok if t > back + 3.0}
    assert len(later) == 2, "an instance was still set aside 3 s after the restart"
