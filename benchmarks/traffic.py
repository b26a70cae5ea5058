"""``python -m benchmarks.traffic``: what traffic management costs a caller.

Sequential calls from one caller to an agent with two instances (versions 1.0.0 and 2.0.0),
on one local nats-server started here, under each policy below; the policy is installed in
the caller as the registry would install it. Scenarios:

- ``no policy``: nothing installed (the mesh runs open);
- ``authorization only``: a policy with an allow rule and no traffic settings: the client
  pipeline is the same chain as with no policy;
- ``split 90/10``: a route with a weighted split over the two versions;
- ``split + affinity``: the same with ``hash_on: metadata.conversation``;
- ``circuit + outliers``: a circuit breaker and outlier detection on the endpoint;
- ``peak EWMA``: the latency-aware balancer;
- ``mirror 20 %``: a fifth of the calls also sent to a shadow agent (the copies cost the
  caller CPU and the shadow its work; the caller's latency should not change).

Wall-clock figures drift on a shared machine: ``--instructions`` instead prints, for each
scenario, the instructions per call that valgrind counts (the difference of two run lengths,
as ``compare.sh`` does), which is what decisions are made on. Writes the ``traffic`` section
of ``docs/benchmarks.md`` with ``--write``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mesh
from mesh._core.identity import load_trust_root, save_trust_root
from mesh._core.policy import PolicyEngine
from mesh.testing import NatsServer, Trust, wait_until

from .meshecho import mesh_config
from .payload import Body, body_of
from .sections import write_section
from .stats import percentile

HEAD = """apiVersion: mesh/v1
kind: Policy
metadata: {name: bench-traffic}
spec:
  defaults: {authorization: allow}
  rules:
    - name: caller-may-call
      allow: {callers: [bench-caller], agent: bench-echo}
"""
SCENARIOS: dict[str, str | None] = {
    "no policy": None,
    "authorization only": HEAD,
    "split 90/10": HEAD
    + """  routes:
    - name: canary
      match: {agent: bench-echo}
      split: [{version: "1.0.0", weight: 90}, {version: "2.0.0", weight: 10}]
""",
    "split + affinity": HEAD
    + """  routes:
    - name: canary
      match: {agent: bench-echo}
      split: [{version: "1.0.0", weight: 90}, {version: "2.0.0", weight: 10}]
      hash_on: metadata.conversation
""",
    "circuit + outliers": HEAD
    + """  endpoints:
    bench-echo.echo:
      circuit_breaker: {consecutive_failures: 5}
      outlier_detection: {consecutive_failures: 5}
""",
    "peak EWMA": HEAD
    + """  endpoints:
    bench-echo.echo: {load_balancer: peak_ewma}
""",
    "mirror 20 %": HEAD
    + """  routes:
    - name: shadow
      match: {agent: bench-echo}
      mirror: {agent: bench-shadow, percent: 20}
""",
}
METADATA = {"conversation": "c-42"}


def config(url: str) -> mesh.MeshConfig:
    """``mesh_config`` with slow heartbeats: under valgrind a run lasts minutes, and the
    background work of a fast heartbeat would count as per-call work."""
    base = mesh_config(url)
    return mesh.MeshConfig(
        servers=base.servers,
        timeouts=base.timeouts,
        directory=mesh.DirectoryConfig(heartbeat=30.0, ttl=120.0, drain_grace=0.1),
        signals_interval=0,
    )


def echo(name: str, version: str) -> mesh.Agent:
    agent = mesh.Agent(name, version=version)

    @agent.endpoint(name="echo", idempotent=True, concurrency=256)
    async def run(q: Body) -> Body:
        return q

    return agent


async def serve(url: str, root: str) -> None:
    """The callees, in their own process (``--serve``): two versions of bench-echo and the
    shadow, until stdin closes."""
    trust = Trust()
    trust.root = load_trust_root(root)
    cfg = config(url)
    async with (
        mesh.Mesh(trust.identity("bench-echo"), cfg, agent=echo("bench-echo", "1.0.0")),
        mesh.Mesh(trust.identity("bench-echo"), cfg, agent=echo("bench-echo", "2.0.0")),
        mesh.Mesh(trust.identity("bench-shadow"), cfg, agent=echo("bench-shadow", "1.0.0")),
    ):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class Callees:
    """The callee process of a run (its instructions are not counted)."""

    def __init__(self, url: str, trust: Trust) -> None:
        self._dir = tempfile.TemporaryDirectory()
        save_trust_root(trust.root, self._dir.name)
        cmd = [sys.executable, "-m", "benchmarks.traffic", "--serve", url, "--root", self._dir.name]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit("the callees did not start")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self._dir.cleanup()


async def calls(policy: str | None, n: int | None, seconds: float) -> list[float]:
    """One scenario, the caller in this process and the callees in another, on a server of
    its own: ``n`` calls (for the instruction count), or calls for ``seconds``; returns each
    call's latency in µs."""
    trust = Trust()
    body = body_of(256)
    async with NatsServer() as srv:
        callees = Callees(srv.url, trust)
        try:
            async with mesh.Mesh(trust.identity("bench-caller"), config(srv.url)) as caller:
                if policy is not None:
                    caller.governance.engine = PolicyEngine(mesh.parse_policy(policy), revision=1)
                await caller.wait_for("bench-echo")
                await caller.wait_for("bench-shadow")
                await wait_until(lambda: len(caller.directory.instances("bench-echo")) == 2, 10)
                for _ in range(200):  # warm-up: pair keys, caches, the chain for this policy
                    await caller.request("bench-echo", "echo", body, Body, metadata=METADATA)
                lat: list[float] = []
                end = time.perf_counter() + seconds
                while len(lat) < n if n is not None else time.perf_counter() < end:
                    t = time.perf_counter()
                    await caller.request("bench-echo", "echo", body, Body, metadata=METADATA)
                    lat.append((time.perf_counter() - t) * 1e6)
                await asyncio.sleep(0.2)  # let mirror copies in flight finish
        finally:
            callees.close()
    return lat


async def timed(seconds: float, rounds: int) -> str:
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SCENARIOS}
    for _ in range(rounds):
        for name, policy in SCENARIOS.items():  # interleaved: drift hits all alike
            lat = sorted(await calls(policy, None, seconds))
            rate = len(lat) / (sum(lat) / 1e6)
            results[name].append((percentile(lat, 50), percentile(lat, 99), rate))
    lines = [
        "| policy in the caller | p50 µs | p99 µs | calls/s (sequential) |",
        "|---|---|---|---|",
    ]
    for name, rows in results.items():
        med = [sorted(r[i] for r in rows)[len(rows) // 2] for i in range(3)]
        lines.append(f"| {name} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} |")
    return "\n".join(lines)


def count(name: str, n: int) -> int:
    """Instructions valgrind counts in the caller's process for ``n`` calls of ``name``."""
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "benchmarks.traffic", "--run", name, "--n", str(n),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
    refs = [line for line in out.splitlines() if "I" in line and "refs:" in line]
    return int(refs[-1].split(":")[1].replace(",", "").strip())


def instructions(n1: int, n2: int) -> str:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    lines = ["| policy in the caller | k instructions per call, in the caller |", "|---|---|"]
    for name in SCENARIOS:
        per = (count(name, n2) - count(name, n1)) / (n2 - n1)
        lines.append(f"| {name} | {per / 1000:.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


TIMED_INTRO = """## Traffic management: what its stages cost a caller

Sequential calls from one caller to an agent with two instances (1.0.0 and 2.0.0, in another
process) under each policy of `benchmarks/traffic.py`, on one local nats-server; medians of
the rounds. Wall-clock figures on two shared cores: the instruction counts below are the ones
to decide on. With a mirror, the shadow runs in the callees' process on the same two cores as
the caller, so the copies' work shows in the caller's latency here; on separate machines it
would not.

    {command} --write
"""

INSTRUCTIONS_INTRO = """### Instructions per call, in the caller

What valgrind counts in the caller's process only (the callees run in another), per call: the
difference of two run lengths, as `compare.sh` does. "authorization only" runs the same chain
as "no policy": stages no rule uses are not in it.

    {command} --write
"""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0, help="per scenario and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--instructions", action="store_true", help="count instructions instead")
    p.add_argument("--n1", type=int, default=100)
    p.add_argument("--n2", type=int, default=600)
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    p.add_argument("--run", choices=list(SCENARIOS), help=argparse.SUPPRESS)  # valgrind's child
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve", help=argparse.SUPPRESS)  # the callees' process: the server URL
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.root))
        return
    if args.run is not None:
        asyncio.run(calls(SCENARIOS[args.run], args.n, 0))
        return
    if args.instructions:
        table = instructions(args.n1, args.n2)
        command = f"python -m benchmarks.traffic --instructions --n1 {args.n1} --n2 {args.n2}"
    else:
        table = asyncio.run(timed(args.seconds, args.rounds))
        command = f"python -m benchmarks.traffic --seconds {args.seconds:g} --rounds {args.rounds}"
    print(table)
    if args.write:
        name = "traffic-instructions" if args.instructions else "traffic"
        text = (INSTRUCTIONS_INTRO if args.instructions else TIMED_INTRO).format(command=command)
        text += f"\n{table}\n"
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", name, text)


if __name__ == "__main__":
    main()
