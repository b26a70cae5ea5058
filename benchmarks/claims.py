"""``python -m benchmarks.claims``: the cost of idempotency claims (``MeshConfig.claims``).

Keyed calls (a fresh idempotency key each) to a non-idempotent echo endpoint, with the
callee's claims on and off, on one local nats-server started here: sequential latency
percentiles and throughput with calls in flight. Not part of ``python -m benchmarks``'s
page; prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import mesh
from mesh.testing import NatsServer, Trust

from .meshecho import mesh_config
from .payload import Body, body_of
from .stats import percentile


def agent() -> mesh.Agent:
    a = mesh.Agent("bench-ledger")

    @a.endpoint(name="charge", concurrency=256)  # not idempotent
    async def charge(q: Body) -> Body:
        return q

    return a


async def measure(
    url: str, trust: Trust, *, claims: bool, seconds: float, inflight: int
) -> dict[str, float]:
    cfg = mesh_config(url)
    server_cfg = mesh.MeshConfig(
        servers=cfg.servers, timeouts=cfg.timeouts, directory=cfg.directory, claims=claims
    )
    body = body_of(256)
    async with (
        mesh.Mesh(trust.identity("bench-ledger"), server_cfg, agent=agent()),
        mesh.Mesh(trust.identity("bench-caller"), cfg) as caller,
    ):
        await caller.wait_for("bench-ledger")

        async def call() -> None:
            await caller.request(
                "bench-ledger", "charge", body, Body, idempotency_key=uuid.uuid4().hex
            )

        for _ in range(200):  # warm-up: bucket, pair keys, certificate caches
            await call()
        lat: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            await call()
            lat.append((time.perf_counter() - t) * 1e6)
        n = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal n
            while time.perf_counter() < end:
                await call()
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        rate = n / (time.perf_counter() - t0)
    lat.sort()
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "rate": rate}


async def main(seconds: float, inflight: int, rounds: int) -> None:
    trust = Trust()
    async with NatsServer() as srv:
        results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(rounds):
            for claims in (False, True):  # interleaved: drift hits both alike
                results[claims].append(
                    await measure(srv.url, trust, claims=claims, seconds=seconds, inflight=inflight)
                )
    print(f"| keyed non-idempotent call | p50 µs | p99 µs | calls/s ({inflight} in flight) |")
    print("|---|---|---|---|")
    for claims in (False, True):
        rows = results[claims]
        med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in ("p50", "p99", "rate")}
        name = "claims on (default)" if claims else "claims off"
        print(f"| {name} | {med['p50']:.0f} | {med['p99']:.0f} | {med['rate']:.0f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    asyncio.run(main(args.seconds, args.inflight, args.rounds))
