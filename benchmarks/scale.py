"""``python -m benchmarks.scale``: many agents on one nats-server.

Starts a nats-server (JetStream, with its monitoring port), the registry and ``--agents``
agents, each with one endpoint, in this process or spread over ``--processes`` worker
processes; then measures:

- start: how many agents started within 60 s each, and how long all took;
- calls: p50 and p99 of ``--calls`` sequential calls from one caller to random agents;
- idle cost: messages per second through the server, and CPU seconds per second of the agent
  processes, over ``--idle`` seconds with no calls (the directory's heartbeats and watches);
- policy: seconds from an ``apply`` until every agent runs the new revision.

``--write`` puts the figures into docs/benchmarks.md (its ``scale`` section, which
``python -m benchmarks`` keeps); a run with another agent count or process count replaces its
own row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import resource
import shlex
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import mesh
from mesh.control_plane import ApplyReply, ApplyRequest, TrustRoot, load_trust_root, save_trust_root
from mesh.testing import NatsServer
from mesh_agents import registry as registry_agent

from .sections import write_section

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "scale-results.json"
POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {{name: scale-{n}}}
spec:
  defaults: {{authorization: allow}}
  endpoints:
    "*.ping": {{timeout: {timeout}s}}
"""


class Ping(BaseModel):
    n: int


def make_agent(name: str) -> mesh.Agent:
    agent = mesh.Agent(name)

    @agent.endpoint(idempotent=True)
    async def ping(p: Ping) -> Ping:
        return p

    return agent


def config(url: str, prefix: str) -> mesh.MeshConfig:
    return mesh.MeshConfig(servers=(url,), prefix=prefix, allow_no_policy=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def start_agents(
    root: TrustRoot, names: list[str], cfg: mesh.MeshConfig
) -> tuple[list[mesh.Mesh], int, float]:
    """Start an agent per name, 20 at a time: the started ones, how many failed, seconds."""
    gate = asyncio.Semaphore(20)

    async def one(name: str) -> mesh.Mesh:
        async with gate:
            m = mesh.Mesh(root.issue_identity(name), cfg, agent=make_agent(name))
            await asyncio.wait_for(m.start(), 60)
            return m

    began = time.perf_counter()
    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    started = [r for r in results if isinstance(r, mesh.Mesh)]
    return started, len(results) - len(started), time.perf_counter() - began


def revision_of(meshes: list[mesh.Mesh]) -> int | None:
    """The revision every one of ``meshes`` runs, or ``None`` while they differ."""
    revisions = {m.governance.engine.revision for m in meshes}
    return revisions.pop() if len(revisions) == 1 else None


# --- a worker process ---------------------------------------------------------------------


async def worker(url: str, root_dir: str, prefix: str, names: list[str]) -> None:
    """Start ``names``; print JSON lines: ``ready``, then ``revision`` each time all of them
    run a new one, and ``cpu`` when asked (a line ``cpu`` on stdin); exit at end of input."""
    root = load_trust_root(root_dir)
    meshes, failed, seconds = await start_agents(root, names, config(url, prefix))

    def say(**doc: Any) -> None:
        print(json.dumps(doc), flush=True)

    say(ready=len(meshes), failed=failed, seconds=seconds)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch() -> None:
        seen = revision_of(meshes)
        while True:
            now = revision_of(meshes)
            if now is not None and now != seen:
                say(revision=now, at=time.time())
                seen = now
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    while line := await reader.readline():
        if line.strip() == b"cpu":
            say(cpu=cpu_seconds())
    watcher.cancel()
    for m in meshes:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(m.drain(), 5)


class Worker:
    """A worker process and the JSON lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                await self.lines.put(json.loads(line))

    async def next(self, key: str, timeout: float) -> dict[str, Any]:
        while True:
            doc = await asyncio.wait_for(self.lines.get(), timeout)
            if key in doc:
                return doc

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")


# --- the measurement ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_messages(monitor: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as r:
        varz = json.load(r)
    return int(varz["in_msgs"])


async def measure(agents: int, processes: int, calls: int, idle: float) -> dict[str, Any]:
    monitor = free_port()
    prefix = f"scale{random.randrange(10**6)}"
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(NatsServer(extra_args=["-m", str(monitor)]))
        cfg = config(server.url, prefix)
        root = TrustRoot.generate()
        keys = stack.enter_context(tempfile.TemporaryDirectory())
        save_trust_root(root, keys)
        registry = mesh.Mesh(
            root.issue_identity("registry", roles=["registry"]),
            cfg,
            agent=registry_agent.registry,
            trust_root=root,
        )
        await registry.start()
        stack.push_async_callback(registry.drain)
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), cfg)
        )

        async def apply(n: int) -> int:
            await admin.wait_for("registry", timeout=30)
            text = POLICY.format(n=n, timeout=10 + n)
            reply = await admin.request(  # a busy server's stores may take long to write
                "registry",
                "apply",
                ApplyRequest(policy=text, source="scale.yaml"),
                ApplyReply,
                timeout=50,
            )
            return reply.revision

        await apply(1)
        names = [f"agent-{i:04d}" for i in range(agents)]
        local: list[mesh.Mesh] = []
        workers: list[Worker] = []
        began = time.perf_counter()
        if processes <= 1:
            local, failed, _ = await start_agents(root, names, cfg)
            started = len(local)
        else:
            for part in range(processes):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "benchmarks.scale", "--worker", "--url", server.url,
                    "--root-dir", keys, "--prefix", prefix, "--names",
                    ",".join(names[part::processes]),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                )  # fmt: skip
                workers.append(Worker(proc))
            readies = [await w.next("ready", 600) for w in workers]
            started = sum(r["ready"] for r in readies)
            failed = sum(r["failed"] for r in readies)
        start_s = time.perf_counter() - began

        latencies: list[float] = []
        errors = 0
        problem = None
        # A process joining the busy mesh: how long its start takes (at most a minute).
        joining = dataclasses.replace(cfg, timeouts=dataclasses.replace(cfg.timeouts, connect=60))
        began = time.perf_counter()
        caller_s: float | None = None
        try:
            caller = await stack.enter_async_context(
                mesh.Mesh(root.issue_identity("caller"), joining)
            )
            caller_s = time.perf_counter() - began
        except mesh.MeshError as exc:  # an overloaded mesh: say so, measure the rest
            problem = f"the caller did not start: {exc.message}"
            calls = 0
        await asyncio.sleep(2)  # let the last records arrive
        live = [n for n in names if calls and caller.directory.instances(n)]
        for i in range(calls):
            name = random.choice(live) if live else names[0]
            t0 = time.perf_counter()
            try:
                await caller.request(name, "ping", Ping(n=i), Ping, timeout=10)
                latencies.append((time.perf_counter() - t0) * 1000)
            except mesh.MeshError:
                errors += 1

        async def workers_cpu() -> float:
            for w in workers:
                w.send("cpu")
            return sum([(await w.next("cpu", 30))["cpu"] for w in workers])

        msgs0, cpu0, worker_cpu0 = server_messages(monitor), cpu_seconds(), await workers_cpu()
        await asyncio.sleep(idle)
        msgs1, cpu1, worker_cpu1 = server_messages(monitor), cpu_seconds(), await workers_cpu()

        t0 = time.time()
        try:
            revision = await asyncio.wait_for(apply(2), 60)
        except (TimeoutError, mesh.MeshError) as exc:
            problem = (problem or "") + f"; apply failed: {exc}"
            revision = -1
        if revision < 0:
            policy_s = None
        elif workers:
            ats = []
            for w in workers:
                while (doc := await w.next("revision", 60))["revision"] != revision:
                    pass
                ats.append(doc["at"])
            policy_s = max(ats) - t0
        else:
            end = time.monotonic() + 60
            while revision_of(local) != revision and time.monotonic() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            policy_s = time.time() - t0 if revision_of(local) == revision else None

        for w in workers:
            assert w.proc.stdin is not None
            w.proc.stdin.close()
        for w in workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 60)
            except TimeoutError:
                w.proc.kill()
        for m in local:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(m.drain(), 5)
    return {
        "agents": agents,
        "processes": max(1, processes),
        "started": started,
        "failed": failed,
        "start_s": round(start_s, 1),
        "calls": calls,
        "call_errors": errors,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(statistics.quantiles(latencies, n=100)[98], 2)
        if len(latencies) >= 100
        else None,
        "idle_msgs_per_s": round((msgs1 - msgs0) / idle),
        "idle_cpu_per_s": round((cpu1 - cpu0 + worker_cpu1 - worker_cpu0) / idle, 3),
        "policy_s": round(policy_s, 3) if policy_s is not None else None,
        "caller_start_s": round(caller_s, 2) if caller_s is not None else None,
        "problem": problem,
    }


def render(rows: list[dict[str, Any]], commands: list[str]) -> str:
    lines = [
        "## Scale",
        "",
        "Many agents, each with one endpoint, on one nats-server (`benchmarks/scale.py`). "
        "Idle cost: messages per second through the server and CPU seconds per second of the "
        "agent processes with no calls (heartbeats, directory watches, head refreshes). "
        "Policy: seconds from an `apply` until every agent runs the new revision. "
        'Each process watches only the agents it calls (`protocol.md` §19 "What a reader '
        'watches"); the caller here calls every agent, so it watches all N. Before that '
        "change every `Mesh` verified every record and beat: 50 agents in one process cost "
        "0.78 CPU s/s idle and took 1.8 s for a policy, and 100 could not start a caller.",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in commands],
        "",
        "| agents | processes | started | start (s) | call p50 (ms) | call p99 (ms) | call errors "
        "| idle msgs/s | idle CPU s/s | policy to all (s) | a caller's start (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["agents"], r["processes"])):
        lines.append(
            f"| {r['agents']} | {r['processes']} | {r['started']} of {r['agents']} | "
            f"{r['start_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['call_errors']} of "
            f"{r['calls']} | {r['idle_msgs_per_s']} | {r['idle_cpu_per_s']} | {r['policy_s']} | "
            f"{r.get('caller_start_s', '')} |"
        )
    for r in rows:
        if r.get("problem"):
            lines.append(f"\n{r['agents']} agents, {r['processes']} process(es): {r['problem']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--processes", type=int, default=1, help="worker processes for the agents")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of the idle measurement")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--root-dir", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        asyncio.run(worker(args.url, args.root_dir, args.prefix, args.names.split(",")))
        return 0
    row = asyncio.run(measure(args.agents, args.processes, args.calls, args.idle))
    command = "python -m benchmarks.scale " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    print(json.dumps(row))
    if args.write:
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
        rows = [
            r
            for r in saved["rows"]
            if (r["agents"], r["processes"]) != (row["agents"], row["processes"])
        ]
        rows.append({**row, "command": command.strip()})
        RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        write_section(PAGE, "scale", render(rows, sorted({r["command"] for r in rows})))
        print(f"wrote {PAGE} and {RESULTS}", file=sys.stderr)
    return 0 if row["failed"] == 0 and not row["problem"] else 1


if __name__ == "__main__":
    sys.exit(main())
