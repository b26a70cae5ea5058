"""Policy propagation: from ``apply`` at the registry to the new revision running in every
agent, and to every agent's directory record acknowledging it.

Child side: ``python -m benchmarks.propagation --url URL --agents N --applies K --prefix P``
starts, in this one process and event loop, the policy registry (``mesh_agents.registry``,
holding the trust root), an admin client (role ``admin``, no agent) and ``N`` agents (each its
own ``Mesh`` and NATS connection, serving one endpoint). It times the agents' start, waits until
the admin's directory lists them all, applies one unmeasured warm-up revision, then ``K``
measured ones, each once every ``Mesh`` in the process has seen the previous one acknowledged
by every agent (its directory work done) and 0.25 s more. Each revision is
``policies/research.yaml`` with another ``metadata.name``. Before stopping its agents it
prints one JSON line (or an ``error``, naming the agents that lag) with ``start_s`` (the N
agents' concurrent start), ``ready_s`` (until the admin's directory lists them all) and, per
apply (milliseconds from just before ``admin.request(registry, apply)``):

- ``applied_ms``: until every agent's ``governance`` runs the new revision: the latest of the
  moments each agent switched to it (``TimedMesh``); ``Governance.wait_for_revision`` in every
  agent confirms it, and ``applied_seen_ms`` is when the last of those waits returned (later
  by however long the busy event loop took to run the waiting tasks);
- ``acked_ms``: until every agent's record in the admin's directory (``admin.directory.all()``,
  what ``mesh-policy agents`` shows) carries the new ``policy_revision`` (polled every 1 ms);
- ``reply_ms``: until the registry's reply reached the admin (signed and stored).

Then it stops everything and prints how long that took.

Every agent watches the directory and verifies every record it receives (Ed25519), so with N
agents in one process each heartbeat round costs N x N verifications: the agents use a 5 s
heartbeat (TTL 15 s), send no golden-signal reports and do not answer the NATS services
protocol, to keep the measurement about propagation. A prefix of its own per run keeps its
directory and policy buckets apart from the other benchmarks' agents.

Parent side: ``propagation_in_child`` runs such a process and returns what it printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

import mesh
from mesh.control_plane import ApplyReply, ApplyRequest, TrustRoot
from mesh.testing import watching_all

__all__ = ["HEARTBEAT", "STOP_LIMIT", "TTL", "propagation_in_child"]

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = ROOT / "policies" / "research.yaml"
HEARTBEAT = 5.0
TTL = 15.0
POLL = 0.001
GAP = 0.25
"""Seconds between every ``Mesh`` having seen one revision acknowledged everywhere and the
next apply."""
SETTLE_POLL = 0.01
WAIT = 30.0
"""Seconds any one step may take (an agent's start, one revision's propagation...)."""
STOP_LIMIT = 6.0
"""Seconds the child waits for its agents to drain before it gives up and exits."""
STOP_GRACE = 30.0
"""Seconds the parent waits for the child to stop, after its result, before killing it."""
KEYS = ("applied_ms", "applied_seen_ms", "acked_ms", "reply_ms")
RESULT = "RESULT "
STOPPED = "STOPPED "
"""Mark the child's result line and its stop time on standard output (agents log there too)."""


async def propagation_in_child(
    url: str, agents: int, applies: int, prefix: str, timeout: float | None = None
) -> dict[str, Any]:
    """Run the propagation child and return what it measured (see the module doc).

    The child prints its result before it stops its agents. ``stop_s`` in the result is how
    long stopping took, or ``None`` when it did not finish: ``stuck_drains`` agents had not
    drained after ``STOP_LIMIT`` (the child then exits anyway), or the child was killed after
    ``STOP_GRACE``.

    Raises:
        RuntimeError: the child failed, printed an error, or gave no result within
            ``timeout`` (default: 2 minutes plus 10 s per apply).
    """
    if timeout is None:
        timeout = 120.0 + 10.0 * applies
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.propagation",
        "--url",
        url,
        "--agents",
        str(agents),
        "--applies",
        str(applies),
        "--prefix",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read())
    stdout = proc.stdout

    async def line_starting(mark: str) -> str | None:
        while line := (await stdout.readline()).decode(errors="replace"):
            if line.startswith(mark):
                return line.removeprefix(mark).strip()
        return None  # the child closed its output: it exited

    async def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def why() -> str:
        return (await stderr).decode(errors="replace")[-2000:]

    try:
        try:
            got = await asyncio.wait_for(line_starting(RESULT), timeout)
        except TimeoutError:
            await kill()
            raise RuntimeError(f"propagation child gave no result in {timeout:g} s") from None
        if got is None:
            await proc.wait()
            raise RuntimeError(f"propagation child failed: {await why()}")
        result: dict[str, Any] = json.loads(got)
        if "error" in result:
            await kill()
            raise RuntimeError(result["error"])
        try:
            stopped = await asyncio.wait_for(line_starting(STOPPED), STOP_GRACE)
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            stopped = None
            await kill()
        result["stop_s"] = None
        if stopped is not None and stopped.startswith("stuck "):
            result["stuck_drains"] = int(stopped.removeprefix("stuck "))
        elif stopped is not None:
            result["stop_s"] = float(stopped)
        return result
    finally:
        if proc.returncode is None:
            await kill()
        stderr.cancel()


# --- child ---------------------------------------------------------------------------------


class Ping(BaseModel):
    n: int = 0


def policy_text(i: int) -> str:
    """``policies/research.yaml`` named ``bench-propagation-<i>``: a new revision each time."""
    doc = yaml.safe_load(POLICY_FILE.read_text())
    doc["metadata"]["name"] = f"bench-propagation-{i}"
    return yaml.safe_dump(doc, sort_keys=False)


class TimedMesh(mesh.Mesh):
    """A ``Mesh`` that notes when its governance switched to each policy revision:
    ``policy_changed`` is what governance calls right after applying one (or refusing it).

    Timing the switch itself, rather than when a waiting task got to run, keeps the event
    loop's backlog (N agents' directory work) out of the propagation time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.switched: dict[int, float] = {}

    def policy_changed(self) -> None:
        revision = self.governance.revision
        if revision is not None and revision not in self.switched:
            self.switched[revision] = time.perf_counter()
        super().policy_changed()


def _agent(name: str) -> mesh.Agent:
    agent = mesh.Agent(name)

    @agent.endpoint(name="ping", idempotent=True)
    async def ping(q: Ping) -> Ping:
        return q

    return agent


def _emit(mark: str, text: str) -> None:
    print(mark + text, flush=True)


async def _measure(url: str, n: int, applies: int, prefix: str) -> None:
    """Measure, print the result (or the error), then stop everything and print how long
    stopping took."""
    root = TrustRoot.generate()
    cfg = mesh.MeshConfig(
        servers=(url,),
        prefix=prefix,
        services=False,
        signals_interval=0,
        timeouts=mesh.Timeouts(request=WAIT, connect=WAIT, drain=2.0),
        directory=mesh.DirectoryConfig(heartbeat=HEARTBEAT, ttl=TTL, drain_grace=0.1),
    )
    out: dict[str, Any] = {"agents": n, **{k: [] for k in KEYS}}
    stack = contextlib.AsyncExitStack()
    try:
        await _run(stack, root, cfg, n, applies, out)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    _emit(RESULT, json.dumps(out))
    t1 = time.perf_counter()
    try:
        await stack.aclose()
    except _StuckDrains as exc:
        _emit(STOPPED, f"stuck {exc.count}")
        os._exit(0)  # the stuck drains would keep this process alive
    _emit(STOPPED, f"{time.perf_counter() - t1:.3f}")


class _StuckDrains(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} drains did not finish in {STOP_LIMIT:g} s")
        self.count = count


async def _run(
    stack: contextlib.AsyncExitStack,
    root: TrustRoot,
    cfg: mesh.MeshConfig,
    n: int,
    applies: int,
    out: dict[str, Any],
) -> None:
    from mesh_agents import registry as reg

    registry = mesh.Mesh(
        root.issue_identity("registry", roles=["registry"]),
        cfg,
        agent=reg.registry,
        trust_root=root,
    )
    await stack.enter_async_context(registry)
    admin = await stack.enter_async_context(
        mesh.Mesh(root.issue_identity("admin", roles=["admin"]), watching_all(cfg))
    )
    await admin.wait_for("registry", WAIT)

    names = [f"prop-{i:03d}" for i in range(n)]
    meshes = [TimedMesh(root.issue_identity(name), cfg, agent=_agent(name)) for name in names]

    async def drain_all() -> None:
        # All at once (one by one takes N x drain_grace), and bounded: Mesh.drain awaits its
        # cancelled heartbeat task, which was seen (in about 1 run of 100 agents in 15) to go on
        # beating: on Python 3.11 asyncio.wait_for (in nats-py's request, under kv.put) can
        # swallow a cancellation that arrives as the reply does.
        drains = [asyncio.create_task(m.drain()) for m in meshes if m.ready]
        if drains:
            _, stuck = await asyncio.wait(drains, timeout=STOP_LIMIT)
            if stuck:
                raise _StuckDrains(len(stuck))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(m.start() for m in meshes))
    finally:
        stack.push_async_callback(drain_all)
    out["start_s"] = time.perf_counter() - t0
    wanted = set(names)
    while {r.agent for r in admin.directory.all()} & wanted != wanted:
        if time.perf_counter() - t0 > WAIT:
            raise RuntimeError("the agents did not all appear in the directory")
        await asyncio.sleep(POLL)
    out["ready_s"] = time.perf_counter() - t0

    def lagging(expected: int) -> str:
        """Which agents have not applied, or not acknowledged, ``expected`` (for errors)."""
        records = {r.agent: r for r in admin.directory.all()}
        late = []
        for m in meshes:
            record = records.get(m.name)
            listed = None if record is None else record.policy_revision
            if (m.governance.revision or 0) < expected or (listed or 0) < expected:
                late.append(
                    f"{m.name} runs {m.governance.revision} (error {m.governance.error}), "
                    f"its record says {listed}"
                )
        return f"{len(late)} of {n} agents lag, e.g. " + "; ".join(late[:3])

    async def apply(i: int, expected: int) -> dict[str, float]:
        async def applied() -> float:
            await asyncio.gather(
                *(m.governance.wait_for_revision(expected, 2 * WAIT) for m in meshes)
            )
            return time.perf_counter()

        async def acked() -> float:
            while True:
                count = 0
                for r in admin.directory.all():
                    if r.agent in wanted and (r.policy_revision or 0) >= expected:
                        count += 1
                if count >= n:
                    return time.perf_counter()
                await asyncio.sleep(POLL)

        text = policy_text(i)
        waiters = [asyncio.create_task(applied()), asyncio.create_task(acked())]
        await asyncio.sleep(0)  # the waiters are in place before the request leaves
        start = time.perf_counter()
        try:
            reply = await admin.request(
                "registry",
                "apply",
                ApplyRequest(policy=text, source=f"bench-{i}.yaml"),
                ApplyReply,
            )
            replied = time.perf_counter()
            if reply.revision != expected or reply.unchanged:
                raise RuntimeError(f"expected revision {expected}, registry said {reply}")
            _, pending = await asyncio.wait(waiters, timeout=WAIT)
            if pending:
                raise RuntimeError(
                    f"revision {expected} not applied and acknowledged everywhere after "
                    f"{WAIT:g} s: {lagging(expected)}"
                )
            seen, ack = (w.result() for w in waiters)
        finally:
            for w in waiters:
                w.cancel()
        done = max(m.switched[expected] for m in meshes)
        times = {"applied_ms": done, "applied_seen_ms": seen, "acked_ms": ack}
        return {k: (t - start) * 1e3 for k, t in {**times, "reply_ms": replied}.items()}

    # The one that watches every agent's records (the agents and the registry watch none:
    # they call nobody here).
    everyone = [admin]

    async def settle(expected: int) -> None:
        """Wait until the admin has seen every agent acknowledge ``expected``: the next apply
        starts once the directory work of this one is done, not in its wake."""
        end = time.perf_counter() + WAIT
        while True:
            late = 0
            for m in everyone:
                acks = 0
                for r in m.directory.all():
                    if r.agent in wanted and (r.policy_revision or 0) >= expected:
                        acks += 1
                late += acks < n
            if not late:
                return
            if time.perf_counter() > end:
                raise RuntimeError(
                    f"{late} of {len(everyone)} meshes did not see revision {expected} "
                    f"acknowledged by every agent within {WAIT:g} s"
                )
            await asyncio.sleep(SETTLE_POLL)

    for i in range(applies + 1):  # the first one warms up; revisions count from 1
        got = await apply(i, i + 1)
        if i > 0:
            for k in KEYS:
                out[k].append(got[k])
        await settle(i + 1)
        await asyncio.sleep(GAP)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.propagation", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--applies", type=int, default=10)
    parser.add_argument("--prefix", default="bench-prop")
    args = parser.parse_args(argv)
    asyncio.run(_measure(args.url, args.agents, args.applies, args.prefix))


if __name__ == "__main__":
    main()
