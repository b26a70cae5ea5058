"""``python -m benchmarks.streaming``: streamed replies and cancellation, measured.

Scenarios, each on one local nats-server started here, everything in this process (one
connection per side, so a mesh and raw nats-py use the same two connections and one core):

- ``stream chunks``: the rate of sealed chunks of one stream of 256-byte bodies from a callee
  mesh (an async-generator endpoint) to a caller mesh, read with credit 64 and 256, measured
  for ``--seconds`` after a warm-up, on the same server and in the same rounds as raw
  nats-py's event rate (one publisher connection, one subscriber connection, 256-byte
  payloads, at most 1024 outstanding, counted at the subscriber) and FastStream's
  publish -> subscribe rate (logging off, the subscriber parsing into the model). Goal: mesh
  chunks/s >= 0.5 x raw nats-py events/s.
- ``cancel tree``: a call tree of in-process agents (one agent and ``Mesh`` per level; every
  handler calls ``--fanout`` handlers of the next level, the leaves wait), cancelled at the
  root's task once every handler runs; the time from ``task.cancel()`` to the last handler's
  ``except asyncio.CancelledError``, ``--reps`` times. Goal: p99 under 50 ms.

Wall-clock figures drift on a shared machine: ``--instructions`` instead counts, for each
system, the instructions per chunk (event) that valgrind counts in this process, both sides
together (the difference of two run lengths, as ``compare.sh`` does). ``--write`` writes the
``streaming`` (or ``streaming-instructions``) section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pydantic import BaseModel

import mesh
from mesh.testing import NatsServer, Trust

from .loads import EVENT_WINDOW, STALL_TIMEOUT, events
from .machine import machine_info
from .payload import Body, body_of
from .sections import write_section
from .stats import percentile
from .systems import FastStreamSystem, RawNatsSystem, System
from .traffic import config

STREAMER = "bench-streamer"
CALLER = "bench-caller"
SIZE = 256
GOAL_RATIO = 0.5
GOAL_CANCEL_P99_MS = 50.0
NOT_RUN = "not run"


class Ask(BaseModel):
    """What the caller asks the streaming endpoint for: this many chunks."""

    chunks: int


def streamer(body: Body) -> mesh.Agent:
    """The callee: ``generate`` yields the same 256-byte model ``chunks`` times (each one
    serialized, sealed and published by the mesh)."""
    agent = mesh.Agent(STREAMER)

    @agent.endpoint(name="generate", concurrency=16)
    async def generate(q: Ask) -> AsyncIterator[Body]:
        for _ in range(q.chunks):
            yield body

    return agent


@contextlib.asynccontextmanager
async def streaming_pair(url: str) -> AsyncIterator[tuple[mesh.Mesh, mesh.Mesh]]:
    """The callee mesh and the caller mesh, on two connections."""
    trust = Trust()
    agent = streamer(body_of(SIZE))
    async with (
        mesh.Mesh(trust.identity(STREAMER), config(url), agent=agent) as callee,
        mesh.Mesh(trust.identity(CALLER), config(url)) as caller,
    ):
        await caller.wait_for(STREAMER)
        # warm-up: pair keys, the pipeline, the first stream's paths
        async for _ in caller.stream(STREAMER, "generate", Ask(chunks=200), Body, credit=64):
            pass
        yield callee, caller


async def idle(meshes: list[mesh.Mesh], timeout: float = 10.0) -> None:
    """Wait until no call is in progress at any of ``meshes``' servers (a cancelled stream or
    tree is forgotten before the next measurement)."""
    servers = [m.server for m in meshes if m.server is not None]
    try:
        await wait_for(lambda: not any(s.running for s in servers), timeout)
    except TimeoutError:
        left = sum(len(s.running) for s in servers)
        raise RuntimeError(f"{left} cancelled calls still running after {timeout:g} s") from None


async def stream_rate(caller: mesh.Mesh, credit: int, seconds: float, warmup: float) -> float:
    """Chunks per second read from one stream, for ``seconds`` after ``warmup``."""
    clock = time.perf_counter
    ask = Ask(chunks=10**9)
    timeout = warmup + seconds + 60
    async with caller.stream(STREAMER, "generate", ask, Body, credit=credit, timeout=timeout) as s:
        it = aiter(s)
        warm_end = clock() + warmup
        while clock() < warm_end:
            await anext(it)
        gc.collect()
        n = 0
        t0 = clock()
        stop = t0 + seconds
        while True:
            await anext(it)
            n += 1
            t = clock()
            if t >= stop:
                break
    return n / (t - t0)


async def stream_rounds(
    credits: list[int], seconds: float, warmup: float, rounds: int, faststream: bool
) -> dict[str, list[float]]:
    """Each round on a server of its own: the mesh stream at each credit, raw nats-py's and
    FastStream's event rates, in an order rotated each round (drift hits all alike)."""
    results: dict[str, list[float]] = {f"mesh-{c}": [] for c in credits}
    results["raw-nats"] = []
    if faststream:
        results["faststream"] = []
    body = body_of(SIZE)
    for r in range(rounds):
        async with NatsServer() as srv, streaming_pair(srv.url) as (callee, caller):
            systems: dict[str, System] = {"raw-nats": RawNatsSystem()}
            if faststream:
                systems["faststream"] = FastStreamSystem()
            try:
                for system in systems.values():
                    await system.open(srv.url, Path("."))
                order = list(results)
                order = order[r % len(order) :] + order[: r % len(order)]
                for name in order:
                    if name.startswith("mesh-"):
                        credit = int(name.removeprefix("mesh-"))
                        rate = await stream_rate(caller, credit, seconds, warmup)
                        await idle([callee])
                    else:
                        system = systems[name]
                        got = await events(
                            system.publish(body), system.sink, seconds=seconds, warmup=warmup
                        )
                        rate = got["throughput_per_s"]
                    results[name].append(rate)
                    print(f"  round {r + 1} {name}: {rate:,.0f} /s", flush=True)
            finally:
                for system in systems.values():
                    await system.close()
    return results


# --- cancel tree --------------------------------------------------------------------------


class Node(BaseModel):
    level: int


class TreeLog:
    """Every handler of the tree: how many started, and when each saw its cancellation."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled: list[tuple[int, float]] = []  # (level, time.perf_counter())
        self.finished = 0  # handlers that left (cancelled or not)

    def reset(self) -> None:
        self.started = self.finished = 0
        self.cancelled = []


def tree_agent(level: int, levels: int, fanout: int, log: TreeLog) -> mesh.Agent:
    """Level ``level`` of the tree: calls ``fanout`` handlers of the next level at once, or,
    at the last level, waits to be cancelled."""
    agent = mesh.Agent(f"bench-tree-{level}")
    child = f"bench-tree-{level + 1}"

    @agent.endpoint(name="node", concurrency=1024)
    async def node(q: Node, ctx: mesh.Context) -> Node:
        log.started += 1
        try:
            if level < levels:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(fanout):
                        tg.create_task(ctx.request(child, "node", Node(level=level + 1), Node))
            else:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.cancelled.append((level, time.perf_counter()))
            raise
        finally:
            log.finished += 1
        return q

    return agent


async def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` every millisecond (finer than ``mesh.testing.wait_until``)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.001)


async def cancel_tree(levels: int, fanout: int, reps: int) -> tuple[int, list[float], list[float]]:
    """``reps`` cancellations of the whole tree: the number of handlers, and per rep the ms
    from ``task.cancel()`` at the root to the last handler's cancellation, and to the first
    leaf's."""
    trust = Trust()
    log = TreeLog()
    total = sum(fanout**i for i in range(levels))
    to_last: list[float] = []
    to_first_leaf: list[float] = []
    async with NatsServer() as srv, contextlib.AsyncExitStack() as stack:
        cfg = config(srv.url)
        meshes = []
        for level in range(1, levels + 1):
            agent = tree_agent(level, levels, fanout, log)
            m = mesh.Mesh(trust.identity(agent.name), cfg, agent=agent)
            meshes.append(await stack.enter_async_context(m))
        root = await stack.enter_async_context(mesh.Mesh(trust.identity("bench-tree-root"), cfg))
        for caller, level in zip([root, *meshes[:-1]], range(1, levels + 1), strict=True):
            await caller.wait_for(f"bench-tree-{level}")
        for rep in range(reps + 2):  # the first two warm pair keys and paths: not counted
            log.reset()
            task = asyncio.create_task(
                root.request("bench-tree-1", "node", Node(level=1), Node, timeout=120)
            )
            await wait_for(lambda: log.started == total, 30)
            await asyncio.sleep(0.05)  # the leaves settle into their wait
            t0 = time.perf_counter()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(lambda: log.finished == total, 30)
            if len(log.cancelled) != total:
                raise RuntimeError(f"{total - len(log.cancelled)} handlers were not cancelled")
            if rep >= 2:
                to_last.append((max(t for _, t in log.cancelled) - t0) * 1000)
                leaves = [t for lvl, t in log.cancelled if lvl == levels]
                to_first_leaf.append((min(leaves) - t0) * 1000)
            await idle(meshes)
            await asyncio.sleep(0.05)
    return total, to_last, to_first_leaf


# --- instructions -------------------------------------------------------------------------


async def publish_n(system: System, n: int) -> None:
    """``n`` events, at most ``EVENT_WINDOW`` outstanding, until the subscriber has them."""
    publish, sink = system.publish(body_of(SIZE)), system.sink
    sink.reset()
    for sent in range(n):
        if sent - sink.count >= EVENT_WINDOW:
            await sink.wait_count(sent - EVENT_WINDOW // 2, STALL_TIMEOUT)
        await publish()
    await sink.wait_count(n, STALL_TIMEOUT)


async def run_n(name: str, n: int, credit: int) -> None:
    """The child valgrind counts: ``n`` chunks (events) of system ``name``."""
    async with NatsServer() as srv:
        if name == "mesh":
            async with streaming_pair(srv.url) as (_callee, caller):
                got = 0
                async for _ in caller.stream(
                    STREAMER, "generate", Ask(chunks=n), Body, credit=credit, timeout=600
                ):
                    got += 1
                assert got == n
            return
        system: System = RawNatsSystem() if name == "raw-nats" else FastStreamSystem()
        await system.open(srv.url, Path("."))
        try:
            await publish_n(system, 200)  # warm-up, as the mesh's
            await publish_n(system, n)
        finally:
            await system.close()


def count(name: str, n: int, credit: int) -> int:
    """Instructions valgrind counts in this process's child for ``n`` chunks of ``name``."""
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "benchmarks.streaming", "--run", name, "--n", str(n),
        "--credits", str(credit),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
    refs = [line for line in out.splitlines() if "I" in line and "refs:" in line]
    return int(refs[-1].split(":")[1].replace(",", "").strip())


def instructions(n1: int, n2: int, credit: int, faststream: bool) -> str:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    names = ["raw-nats", *(["faststream"] if faststream else []), "mesh"]
    per: dict[str, float] = {}
    for name in names:
        per[name] = (count(name, n2, credit) - count(name, n1, credit)) / (n2 - n1)
        print(f"  {name}: {per[name] / 1000:.1f} k instructions per chunk", flush=True)
    label = {
        "raw-nats": "raw nats-py",
        "faststream": "FastStream",
        "mesh": f"mesh, credit {credit}",
    }
    lines = [
        "| system | k instructions per chunk (event), both sides | / raw nats-py |",
        "|---|--:|--:|",
    ]
    for name in names:
        ratio = per[name] / per["raw-nats"]
        lines.append(f"| {label[name]} | {per[name] / 1000:.1f} | {ratio:.1f}x |")
    goal = per["raw-nats"] / GOAL_RATIO
    lines.append("")
    lines.append(
        f"For the goal (>= {GOAL_RATIO:g}x raw nats-py's rate on one core) a chunk may cost at "
        f"most {goal / 1000:.1f} k instructions ({1 / GOAL_RATIO:g}x raw nats-py's per event): "
        f"it costs {per['mesh'] / goal:.2f}x that now, "
        f"{(per['mesh'] - goal) / 1000:.0f} k too many."
    )
    return "\n".join(lines)


# --- the page -----------------------------------------------------------------------------


def timed_table(
    rates: dict[str, list[float]],
    credits: list[int],
    tree: tuple[int, list[float], list[float]] | None,
    levels: int,
    fanout: int,
) -> str:
    raw = statistics.median(rates["raw-nats"]) if rates else 0.0
    fast = statistics.median(rates["faststream"]) if "faststream" in rates else None
    lines = [
        "| scenario | mesh | raw nats-py | FastStream | mesh / raw | goal | met |",
        "|---|--:|--:|--:|--:|---|---|",
    ]
    for c in credits if rates else []:
        mesh_rate = statistics.median(rates[f"mesh-{c}"])
        ratio = mesh_rate / raw
        met = "met" if ratio >= GOAL_RATIO else f"not met: {GOAL_RATIO / ratio:.1f}x short"
        lines.append(
            f"| stream chunks, 256 B, credit {c} (/s) | {mesh_rate:,.0f} | {raw:,.0f} | "
            f"{'-' if fast is None else f'{fast:,.0f}'} | {ratio:.2f}x | "
            f">= {GOAL_RATIO:g}x raw | {met} |"
        )
    if tree is not None:
        total, to_last, to_first = tree
        s = sorted(to_last)
        p50, p99 = percentile(s, 50), percentile(s, 99)
        over = p99 / GOAL_CANCEL_P99_MS
        met = "met" if p99 < GOAL_CANCEL_P99_MS else f"not met: {over:.1f}x over"
        what = f"cancel tree, {levels} levels x fan-out {fanout} = {total} handlers"
        lines.append(f"| {what}, root to last handler, p50 (ms) | {p50:.1f} | - | - | - | - | - |")
        lines.append(
            f"| {what}, root to last handler, p99 (ms) | {p99:.1f} | - | - | - | "
            f"p99 < {GOAL_CANCEL_P99_MS:g} ms | {met} |"
        )
        first = percentile(sorted(to_first), 50)
        lines.append(f"| {what}, root to first leaf, p50 (ms) | {first:.1f} | - | - | - | - | - |")
    if rates:
        spread = ", ".join(
            f"{name} {min(v):,.0f} to {max(v):,.0f}" for name, v in rates.items() if v
        )
        lines += ["", f"Rates per round (/s), lowest to highest: {spread}."]
    return "\n".join(lines)


def machine_note() -> str:
    m = machine_info()
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work; run under `nice`), "
        f"{m['python']}, nats-py {m['nats-py']}, FastStream {m['faststream']}, "
        f"nats-server {m['nats-server']}, pydantic {m['pydantic']}; {m['date']}."
    )


TIMED_INTRO = """## Streaming and cancellation

`benchmarks/streaming.py`, on one local nats-server, everything in one process (each side on
its own connection, so all systems share the same core and the server has the other).

- **stream chunks**: one stream of 256-byte chunks from a callee mesh (an async-generator
  endpoint yielding the same model: each chunk serialized, sealed, numbered and published) to
  a caller mesh that opens, checks and parses each into the model; read for {seconds:g} s
  after {warmup:g} s of warm-up; medians of {rounds} rounds. In the same rounds on the same
  server: raw nats-py's event rate (one publisher connection, one subscriber connection,
  pre-encoded 256-byte payloads, at most 1024 outstanding, counted at the subscriber, no
  parsing) and FastStream's publish -> subscribe rate (logging off, the subscriber parsing
  into the model), as the events scenario of the main table measures them.
- **cancel tree**: one agent (and `Mesh`) per level; each handler calls {fanout} handlers of
  the next level at once (`ctx.request` in a task group), the leaves wait. Once all
  {total} handlers run, the root's task is cancelled; the time from `task.cancel()` to the
  last handler's `except asyncio.CancelledError` (`time.perf_counter()`, one process, one
  clock), {reps} times.

Wall-clock figures on two cores shared with other work drift from round to round (the
spread is under the table): the instruction counts below are the ones to decide on.

{machine}

    {command}
"""

INSTRUCTIONS_INTRO = """### Instructions per chunk

What valgrind counts in the benchmark's process (both sides: the callee's and the caller's
mesh, or the publisher's and the subscriber's connection), per chunk or event: the
difference of two run lengths ({n1} and {n2} chunks), as `compare.sh` does. The nats-server
runs in another process and is not counted.

    {command}
"""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement and round")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--credits", default="64,256", help="credits of the mesh streams")
    p.add_argument("--no-faststream", action="store_true", help="leave FastStream out")
    p.add_argument("--levels", type=int, default=4, help="of the cancel tree")
    p.add_argument("--fanout", type=int, default=3)
    p.add_argument("--reps", type=int, default=30, help="cancellations of the tree")
    p.add_argument("--only", choices=["stream", "cancel"], help="run one scenario only")
    p.add_argument("--instructions", action="store_true", help="count instructions instead")
    p.add_argument("--n1", type=int, default=500)
    p.add_argument("--n2", type=int, default=3000)
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    p.add_argument("--run", choices=["mesh", "raw-nats", "faststream"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)  # valgrind's child
    args = p.parse_args()
    credits = [int(c) for c in args.credits.split(",")]
    faststream = not args.no_faststream
    if args.run is not None:
        asyncio.run(run_n(args.run, args.n, credits[0]))
        return
    if args.instructions:
        table = instructions(args.n1, args.n2, credits[0], faststream)
        command = (
            f"nice python -m benchmarks.streaming --instructions --n1 {args.n1} --n2 {args.n2}"
            f" --credits {credits[0]}" + (" --no-faststream" if not faststream else "")
        )
        text = INSTRUCTIONS_INTRO.format(command=command + " --write", n1=args.n1, n2=args.n2)
        name = "streaming-instructions"
    else:
        rates: dict[str, list[float]] = {}
        tree = None
        if args.only != "cancel":
            print("stream chunks", flush=True)
            rates = asyncio.run(
                stream_rounds(credits, args.seconds, args.warmup, args.rounds, faststream)
            )
        if args.only != "stream":
            print("cancel tree", flush=True)
            tree = asyncio.run(cancel_tree(args.levels, args.fanout, args.reps))
        table = timed_table(rates, credits, tree, args.levels, args.fanout)
        command = (
            f"nice python -m benchmarks.streaming --seconds {args.seconds:g} --warmup "
            f"{args.warmup:g} --rounds {args.rounds} --credits {args.credits} --levels "
            f"{args.levels} --fanout {args.fanout} --reps {args.reps}"
            + (" --no-faststream" if not faststream else "")
            + (f" --only {args.only}" if args.only else "")
        )
        text = TIMED_INTRO.format(
            seconds=args.seconds, warmup=args.warmup, rounds=args.rounds, fanout=args.fanout,
            total=sum(args.fanout**i for i in range(args.levels)), reps=args.reps,
            machine=machine_note(), command=command + " --write",
        )  # fmt: skip
        name = "streaming"
    print(table)
    if args.write:
        text += f"\n{table}\n"
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", name, text)


if __name__ == "__main__":
    main()
