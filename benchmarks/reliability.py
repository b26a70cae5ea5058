"""``python -m benchmarks.reliability``: the data plane through broker outages, measured.

Scenarios (each starts its own nats-server processes; the agents run in this process, each
with its own connection, at the mesh's default directory settings: heartbeat 1 s, ttl 4 s):

- ``leader-kill``: a three-node cluster; the caller and one of two worker instances connect to
  the node leading the directory stream (``KV_<p>-directory``), the other worker to another
  node; that node is SIGKILLed under steady keyed load on an idempotent endpoint.
- ``restart``: one server, SIGKILLed under steady keyed load on a non-idempotent endpoint and
  restarted on the same port (same store) after ``--down`` seconds; two worker instances.

For each run it prints what was sent, answered and lost, the longest time without an OK answer
around the outage, latencies, and how the mesh got through (retries, watch re-creations).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass, field

import nats
from pydantic import BaseModel

import mesh
from mesh._transport.nats import NatsTransport
from mesh.testing import NatsCluster, NatsServer, Trust


class Job(BaseModel):
    n: int
    work_ms: int


class Done(BaseModel):
    n: int
    instance: str


def worker() -> mesh.Agent:
    agent = mesh.Agent("worker")

    @agent.endpoint(idempotent=True, concurrency=512)
    async def idem(job: Job, ctx: mesh.Context) -> Done:
        await asyncio.sleep(job.work_ms / 1000)
        return Done(n=job.n, instance=ctx.mesh.instance)

    @agent.endpoint(concurrency=512)
    async def keyed(job: Job, ctx: mesh.Context) -> Done:
        await asyncio.sleep(job.work_ms / 1000)
        return Done(n=job.n, instance=ctx.mesh.instance)

    return agent


def config(servers: list[str], request: float) -> mesh.MeshConfig:
    return mesh.MeshConfig(
        servers=tuple(servers),
        timeouts=mesh.Timeouts(request=request, connect=30.0, drain=2.0),
    )


def pinned(urls: list[str], first: int) -> NatsTransport:
    """A connection that prefers node ``first`` and fails over to the others in order."""
    return NatsTransport(urls[first:] + urls[:first], options={"dont_randomize": True})


@dataclass
class Run:
    sent: int = 0
    ok: list[tuple[float, float, str]] = field(default_factory=list)  # done at, latency, who
    failed: list[str] = field(default_factory=list)
    outage: float = 0.0  # when the server was killed (monotonic)
    back: float = 0.0  # when it was back (restart), or the kill again (leader kill)
    retried: int = 0
    restarts: dict[str, int] = field(default_factory=dict)

    def max_gap(self, start: float, end: float) -> float:
        times = [start, *sorted(t for t, _, _ in self.ok if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))

    def all_serving_after(self, since: float, instances: int) -> float | None:
        """Seconds after ``since`` until every instance has answered again."""
        seen: set[str] = set()
        for t, _, who in sorted(self.ok):
            if t >= since:
                seen.add(who)
                if len(seen) == instances:
                    return t - since
        return None

    def line(self, label: str, instances: int) -> str:
        lat = sorted(latency for _, latency, _ in self.ok) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        gap = self.max_gap(self.outage - 1.0, self.back + 8.0)
        spread = self.all_serving_after(self.back, instances)
        return (
            f"{label}: sent {self.sent}, ok {len(self.ok)}, lost {len(self.failed)}, "
            f"longest gap without an OK {gap:.2f} s, latency p50 {statistics.median(lat):.3f} s "
            f"p99 {p99:.3f} s max {lat[-1]:.3f} s, all {instances} instances answering "
            f"{'never' if spread is None else f'{spread:.2f} s'} after recovery, "
            f"retried {self.retried}, watch re-created {self.restarts or 0}"
        )


async def steady(
    caller: mesh.Mesh, endpoint: str, rate: float, seconds: float, timeout: float, run: Run
) -> None:
    async def one(i: int) -> None:
        started = time.monotonic()
        try:
            reply = await caller.request(
                "worker",
                endpoint,
                Job(n=i, work_ms=5),
                Done,
                timeout=timeout,
                idempotency_key=f"k{i}",
            )
        except mesh.MeshError as exc:
            run.failed.append(f"{type(exc).__name__}: {exc}")
        else:
            now = time.monotonic()
            run.ok.append((now, now - started, reply.instance))

    tasks = []
    start = time.monotonic()
    while (now := time.monotonic()) < start + seconds:
        target = start + run.sent / rate
        if target > now:
            await asyncio.sleep(target - now)
        tasks.append(asyncio.create_task(one(run.sent)))
        run.sent += 1
    await asyncio.gather(*tasks)


async def both_listed(caller: mesh.Mesh) -> None:
    await caller.wait_for("worker", 30)
    deadline = time.monotonic() + 30
    # The directory has no event to wait on: poll.
    while len(caller.directory.instances("worker")) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _leader(url: str, stream: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


async def leader_kill(trust: Trust, rate: float, seconds: float, timeout: float) -> Run:
    run = Run()
    async with NatsCluster(3) as cluster:
        urls = cluster.urls
        cfg = config(urls, timeout)
        async with mesh.Mesh(trust.identity("probe"), cfg, transport=pinned(urls, 0)):
            leader = await _leader(urls[0], "KV_mesh-directory")
        at = next(i for i, node in enumerate(cluster.nodes) if leader in repr(node))
        other = (at + 1) % 3
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker(), transport=pinned(urls, at)),
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker(), transport=pinned(urls, other)),
            mesh.Mesh(trust.identity("alice"), cfg, transport=pinned(urls, at)) as alice,
        ):
            await both_listed(alice)
            load = asyncio.create_task(steady(alice, "idem", rate, seconds, timeout, run))
            await asyncio.sleep(seconds / 3)
            run.outage = run.back = time.monotonic()
            await cluster.nodes[at].kill()
            await load
            run.retried = alice.stats.fates.get("ok_after_retry", 0)
            run.restarts = dict(alice.directory.watch_restarts)
    return run


async def restart(trust: Trust, rate: float, seconds: float, timeout: float, down: float) -> Run:
    run = Run()
    server = NatsServer()
    await server.start()
    try:
        cfg = config([server.url], timeout)
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker()),
            mesh.Mesh(trust.identity("worker"), cfg, agent=worker()),
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await both_listed(alice)
            load = asyncio.create_task(steady(alice, "keyed", rate, seconds, timeout, run))
            await asyncio.sleep(2.0)
            run.outage = time.monotonic()
            await server.kill()
            await asyncio.sleep(down)
            await server.start()
            run.back = time.monotonic()
            await load
            run.retried = alice.stats.fates.get("ok_after_retry", 0)
            run.restarts = dict(alice.directory.watch_restarts)
    finally:
        await server.stop()
    return run


async def main(args: argparse.Namespace) -> None:
    trust = Trust()
    if args.scenario in ("leader-kill", "all"):
        print(
            f"leader-kill: 3 nodes, {args.rate:g} req/s keyed idempotent, {args.timeout:g} s "
            "deadlines, the node leading the directory stream (and the caller's) SIGKILLed"
        )
        for i in range(args.runs if args.scenario == "leader-kill" else 1):
            run = await leader_kill(trust, args.rate, 12.0, args.timeout)
            print("  " + run.line(f"run {i + 1}", 2), flush=True)
            for failure in sorted(set(run.failed))[:3]:
                print(f"    lost: {failure}")
    if args.scenario in ("restart", "all"):
        print(
            f"restart: 1 server, {args.rate:g} req/s keyed, {args.timeout:g} s deadlines, "
            f"SIGKILL, restarted on the same port after {args.down:g} s"
        )
        totals = []
        for i in range(args.runs):
            run = await restart(trust, args.rate, 14.0, args.timeout, args.down)
            totals.append(len(run.failed))
            print("  " + run.line(f"run {i + 1}", 2), flush=True)
            for failure in sorted(set(run.failed))[:3]:
                print(f"    lost: {failure}")
        print(f"  lost over {args.runs} runs: {sum(totals)} ({totals})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    p.add_argument("scenario", choices=["leader-kill", "restart", "all"], nargs="?", default="all")
    p.add_argument("--runs", type=int, default=10, help="runs of the restart scenario")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each request, s")
    p.add_argument("--down", type=float, default=3.0, help="seconds the server stays down")
    return p


if __name__ == "__main__":
    asyncio.run(main(_parser().parse_args()))
