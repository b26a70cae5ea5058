"""Cancellation of whole call trees on a real nats-server: a caller that stops waiting (its
task cancelled) or a deadline that passes ends every handler below it, across processes, and
leaves nothing behind.

The tree of the first two tests has 5 levels and 50 handlers (1 + 3 + 6 + 12 + 28, the last
fan-out uneven), each level an agent of ``cancel_workers.py`` in its own ``mesh-agent run``
process; each handler calls its children at once (``asyncio.gather`` of ``ctx.request``) and
the leaves sleep. The handlers' records (``started``/``cancelled``/...) are read from the
files each process appends to; what is still running from each instance's ``tasks`` endpoint
and its access log. The property test drives a small in-process tree with random cancel
delays, deadlines and leaf durations. How cancellation itself works: ``docs/protocol.md``
section 21 and ``mesh/_runtime/client.py`` (``attempt``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mesh
from mesh.testing import NatsServer, Trust, test_config

from .cancel_workers import (
    ENV_LOG,
    LEVELS,
    Done,
    Node,
    Probe,
    Recorder,
    Tasks,
    call_tasks,
    make_level,
)
from .cli_helpers import base_env

REPO = Path(__file__).resolve().parents[2]
MESH_AGENT = str(Path(sys.executable).parent / "mesh-agent")
WORKERS = "tests.integration.cancel_workers"
COUNTS = (1, 3, 6, 12, 28)  # handlers per level: 50 in all
PROPAGATION_BOUND = 5.0  # seconds from the cancel (or the deadline) to the last handler's end
SETTLE_BOUND = 5.0  # seconds for every instance to report nothing in progress


def spread(children: int, parents: int) -> list[int]:
    """``children`` shared among ``parents`` as evenly as possible, the larger shares first."""
    base, extra = divmod(children, parents)
    return [base + 1 if i < extra else base for i in range(parents)]


def build_tree(counts: tuple[int, ...], agents: list[str], leaf_s: float = 600.0) -> Node:
    """A tree with ``counts[k]`` handlers on level ``k`` (one root), level ``k`` served by
    ``agents[k]``; paths name each node by its position (``1``, ``1.0``, ``1.0.2``...)."""
    assert counts[0] == 1 and len(counts) == len(agents)
    root = Node(path="1", agent=agents[0], sleep_s=leaf_s)
    level = [root]
    for depth in range(1, len(counts)):
        below: list[Node] = []
        for parent, n in zip(level, spread(counts[depth], len(level)), strict=True):
            parent.kids = [
                Node(path=f"{parent.path}.{i}", agent=agents[depth], sleep_s=leaf_s)
                for i in range(n)
            ]
            below.extend(parent.kids)
        level = below
    return root


def level_of(path: str) -> int:
    return path.count(".") + 1


async def poll(check, timeout: float, what, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Call ``check`` (sync or async) until it returns something true; return that. Fails the
    test with ``what`` (text, or a function giving it) and the last value after ``timeout``
    seconds."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(
                f"{what() if callable(what) else what}: not within {timeout:g} s (last: {got!r})"
            )
        await asyncio.sleep(interval)


# --- the tree in five processes -------------------------------------------------------------


@dataclass
class Events:
    """The records of every process's handlers: ``(unix time, event, path)``."""

    rows: list[tuple[float, str, str]] = field(default_factory=list)

    def by(self, event: str) -> dict[str, float]:
        return {p: ts for ts, e, p in self.rows if e == event}

    def ends(self) -> dict[str, tuple[str, float]]:
        return {p: (e, ts) for ts, e, p in self.rows if e != "started"}


class TreeFleet:
    """Agents ``tree1`` to ``tree5``, each in its own ``mesh-agent run`` process, with its
    records file, access log (stdout) and stderr in its own folder."""

    def __init__(self, url: str, trust: Trust, tmp: Path) -> None:
        self.url, self.trust, self.tmp = url, trust, tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes], list[IO[bytes]]]] = []
        self.agents = [f"tree{k}" for k in range(1, LEVELS + 1)]

    def folder(self, agent: str) -> Path:
        return self.tmp / agent

    def start(self) -> None:
        for agent in self.agents:
            d = self.folder(agent)
            mesh.save_identity(self.trust.identity(agent), d)
            env = base_env(
                columns=None,
                servers=self.url,
                identity=d,
                allow_no_policy="1",  # no registry in this mesh
                drain_timeout="2s",
                access_log="1",
            )
            env[ENV_LOG] = str(d / "events.log")
            env["PYTHONUNBUFFERED"] = "1"  # access-log lines reach the file as written
            out, err = (d / "access.log").open("wb"), (d / "stderr.log").open("wb")
            proc = subprocess.Popen(
                [MESH_AGENT, "run", f"{WORKERS}:{agent}", "--log-level", "warning"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=err,
            )
            self.procs.append((agent, proc, [out, err]))

    def dead(self) -> str:
        """What the processes that exited said, if any did."""
        said = []
        for agent, proc, _ in self.procs:
            if proc.poll() is not None:
                text = (self.folder(agent) / "stderr.log").read_text(errors="replace")
                said.append(f"{agent} exited with {proc.returncode}:\n{text[-3000:]}")
        return "\n".join(said)

    def events(self) -> Events:
        rows: list[tuple[float, str, str]] = []
        for agent in self.agents:
            path = self.folder(agent) / "events.log"
            if not path.exists():
                continue
            for line in path.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue  # being written
                event, node, ts = line.split()
                rows.append((float(ts), event, node))
        return Events(sorted(rows))

    def access(self, endpoint: str = "node") -> list[dict[str, object]]:
        """The access-log lines of every process for ``endpoint``."""
        lines = []
        for agent in self.agents:
            for line in (self.folder(agent) / "access.log").read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("event") == "access" and entry.get("endpoint") == endpoint:
                        lines.append(entry)
        return lines

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, files in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for f in files:
                f.close()


@pytest.fixture
def fleet(nats_server: NatsServer, trust: Trust, tmp_path: Path) -> Iterator[TreeFleet]:
    f = TreeFleet(nats_server.url, trust, tmp_path)
    f.start()
    try:
        yield f
    finally:
        f.stop()


async def probe(caller: mesh.Mesh, agents: list[str]) -> dict[str, Tasks]:
    replies = await asyncio.gather(
        *(caller.request(a, "tasks", Probe(), Tasks, timeout=5) for a in agents)
    )
    return dict(zip(agents, replies, strict=True))


async def ready(caller: mesh.Mesh, fleet: TreeFleet) -> dict[str, Tasks]:
    """Wait for every agent of the fleet; return each instance's ``tasks`` report at rest."""
    for agent in fleet.agents:
        try:
            await caller.wait_for(agent, timeout=40)
        except mesh.Unavailable:
            pytest.fail(f"{agent} did not come up\n{fleet.dead()}")
    await probe(caller, fleet.agents)  # the first calls: pair keys, balancer state
    return await probe(caller, fleet.agents)


async def nothing_left(caller: mesh.Mesh, agents: list[str], baseline: dict[str, Tasks]) -> None:
    """Every instance soon reports no call in progress, no task serving a request or running
    a nested call, no handler live, and no more asyncio tasks than at rest before the tree."""

    async def check() -> bool | dict[str, Tasks]:
        reports = await probe(caller, agents)
        clean = all(
            r.in_progress == 0 and not r.call_tasks and not r.live and r.tasks <= baseline[a].tasks
            for a, r in reports.items()
        )
        return reports if clean else False

    try:
        await poll(check, SETTLE_BOUND, "instances still busy", interval=0.1)
    except pytest.fail.Exception:
        reports = await probe(caller, agents)
        pytest.fail(
            "left behind: "
            + "; ".join(
                f"{a}: in_progress={r.in_progress} call_tasks={r.call_tasks} live={r.live} "
                f"tasks={r.tasks} (at rest {baseline[a].tasks})"
                for a, r in reports.items()
            )
        )


def report_times(what: str, since: float, ends: dict[str, tuple[str, float]]) -> float:
    """Print the time from ``since`` to the last end on each level and overall; return it."""
    per_level: dict[int, float] = {}
    for path, (_, ts) in ends.items():
        lvl = level_of(path)
        per_level[lvl] = max(per_level.get(lvl, 0.0), ts - since)
    last = max(per_level.values())
    levels = ", ".join(f"level {k}: {per_level[k] * 1000:.1f} ms" for k in sorted(per_level))
    print(f"\n{what}: last handler ended {last * 1000:.1f} ms after ({levels})")
    return last


async def test_cancelling_the_callers_task_cancels_all_50_handlers_in_five_processes(
    nats_server: NatsServer, trust: Trust, fleet: TreeFleet
) -> None:
    """The caller's task awaiting the root is cancelled once all 50 handlers (5 levels, 5
    processes) have started: every one of them is cancelled (``CancelledError`` in the
    handler) within 5 s, each callee counts and logs the calls as CANCELLED, and no instance
    has a call, a nested call's task or a handler left."""
    root = build_tree(COUNTS, fleet.agents)
    paths = root.paths()
    assert len(paths) == 50 == len(set(paths))
    async with mesh.Mesh(trust.identity("caller"), test_config([nats_server.url])) as caller:
        baseline = await ready(caller, fleet)

        task = asyncio.create_task(caller.request("tree1", "node", root, Done, timeout=60))
        began = time.time()
        await poll(lambda: len(fleet.events().by("started")) == 50, 20, "all 50 started")
        print(f"\ntree of 50 built in {(time.time() - began) * 1000:.0f} ms")
        assert not task.done()
        cancelled_at = time.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await poll(lambda: len(fleet.events().ends()) == 50, PROPAGATION_BOUND, "all 50 ended")
        events = fleet.events()
        ends = events.ends()
        assert set(ends) == set(paths)
        not_cancelled = {p: e for p, (e, _) in ends.items() if e != "cancelled"}
        assert not not_cancelled
        last = report_times("cancel", cancelled_at, ends)
        assert last < PROPAGATION_BOUND
        assert all(ts >= cancelled_at for _, ts in ends.values())  # none ended before

        await nothing_left(caller, fleet.agents, baseline)
        reports = await probe(caller, fleet.agents)
        for k, agent in enumerate(fleet.agents):
            r = reports[agent]
            assert (r.requests, r.errors, r.last_error) == (COUNTS[k], COUNTS[k], "CANCELLED"), r
        access = await poll(lambda: len(fleet.access()) == 50 and fleet.access(), 5, "access log")
        assert {line["code"] for line in access} == {"CANCELLED"}


async def test_a_deadline_that_passes_cancels_all_50_handlers_in_five_processes(
    nats_server: NatsServer, trust: Trust, fleet: TreeFleet
) -> None:
    """The root is called with a 1.5 s timeout; the tree of 50 is built well before it. At
    the deadline nobody sends a cancel to the root (its caller only stops waiting, with
    DEADLINE_EXCEEDED): each callee's own deadline cancels its handler, and so the nested
    calls. Every handler is cancelled, within 5 s of the deadline, and nothing is left."""
    root = build_tree(COUNTS, fleet.agents)
    paths = root.paths()
    async with mesh.Mesh(trust.identity("caller"), test_config([nats_server.url])) as caller:
        baseline = await ready(caller, fleet)

        before = time.time()
        task = asyncio.create_task(caller.request("tree1", "node", root, Done, timeout=1.5))
        deadline = before + 1.5  # at or before the call's own (taken a little later)
        await poll(lambda: len(fleet.events().by("started")) == 50, 1.5, "all 50 started")
        built = time.time() - before
        print(f"\ntree of 50 built in {built * 1000:.0f} ms")
        assert not task.done()
        with pytest.raises(mesh.DeadlineExceeded):
            await task
        caller_gave_up = time.time() - deadline

        await poll(lambda: len(fleet.events().ends()) == 50, PROPAGATION_BOUND, "all 50 ended")
        ends = fleet.events().ends()
        assert set(ends) == set(paths)
        not_cancelled = {p: e for p, (e, _) in ends.items() if e != "cancelled"}
        assert not not_cancelled
        last = report_times("deadline", deadline, ends)
        print(f"caller gave up {caller_gave_up * 1000:.1f} ms after the deadline")
        assert last < PROPAGATION_BOUND
        assert all(ts >= deadline - 0.01 for _, ts in ends.values())  # none before its deadline

        await nothing_left(caller, fleet.agents, baseline)
        reports = await probe(caller, fleet.agents)
        for k, agent in enumerate(fleet.agents):
            r = reports[agent]
            assert (r.requests, r.errors) == (COUNTS[k], COUNTS[k]), r
            assert r.last_error in ("DEADLINE_EXCEEDED", "CANCELLED"), r
        access = await poll(lambda: len(fleet.access()) == 50 and fleet.access(), 5, "access log")
        assert {line["code"] for line in access} <= {"DEADLINE_EXCEEDED", "CANCELLED"}
        assert reports["tree1"].last_error == "DEADLINE_EXCEEDED"  # nobody cancelled the root


# --- property: a small tree in the test process ----------------------------------------------

SMALL = (1, 2, 4)  # 3 levels, fan-out 2: 7 handlers
SMALL_BOUND = 0.3  # seconds from the cancel or the deadline to the last handler's end
# (in one process a cancel crosses the 3 levels in milliseconds; the bound is kept below most
# gaps between a cancel and the deadline, so that a cancel that did not propagate, leaving
# the handlers to the deadline, is caught)


@dataclass
class SmallTree:
    caller: mesh.Mesh
    servers: list[mesh.Mesh]
    recorder: Recorder
    agents: list[str]


@pytest.fixture
async def small_tree(nats_server: NatsServer, trust: Trust) -> AsyncIterator[SmallTree]:
    """Agents ``small1`` to ``small3`` served by meshes in the test process, all recording to
    one ``Recorder``, and a caller; started once for all the examples of a test."""
    recorder = Recorder()
    agents = [f"small{k}" for k in range(1, len(SMALL) + 1)]
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                mesh.Mesh(trust.identity(a), cfg, agent=make_level(a, recorder))
            )
            for a in agents
        ]
        caller = await stack.enter_async_context(mesh.Mesh(trust.identity("caller"), cfg))
        for a in agents:
            await caller.wait_for(a)
        yield SmallTree(caller, servers, recorder, agents)


def leftovers(tree: SmallTree) -> list[str]:
    """What is still running anywhere in the small tree (empty when nothing is)."""
    found = [f"live handlers {sorted(tree.recorder.live)}"] if tree.recorder.live else []
    for name, m in zip([*tree.agents, "caller"], [*tree.servers, tree.caller], strict=True):
        if m.server is not None and m.server.running:
            found.append(f"{name} serving {len(m.server.running)}")
        # Attempts still waiting for a reply (the inbox is private; a leak would show here).
        if m._inbox._pending:
            found.append(f"{name}: {len(m._inbox._pending)} attempts pending")
    tasks = call_tasks()
    if tasks:
        found.append(f"tasks {tasks}")
    return found


@settings(
    max_examples=25,
    deadline=None,
    # The meshes are started once per test and shared by its examples, on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cancel_ms=st.integers(0, 300),
    deadline_ms=st.integers(50, 500),
    leaf_ms=st.integers(0, 1500),
)
async def test_any_cancel_or_deadline_leaves_no_handler_behind(
    small_tree: SmallTree, cancel_ms: int, deadline_ms: int, leaf_ms: int
) -> None:
    """Whatever comes first, a cancel of the caller's task after ``cancel_ms``, the deadline
    after ``deadline_ms``, or the leaves finishing after ``leaf_ms`` (often after both): the
    caller sees a reply, CancelledError or DEADLINE_EXCEEDED. Unless it got a reply, every
    handler that started ends within ``SMALL_BOUND`` of the earlier of the cancel and the
    deadline, however long its leaves would have slept (so a cancel is not merely overtaken
    by the deadline), each either finished (before the cancel reached it), cancelled, or (once
    the deadline passed) failed with a nested call's DEADLINE_EXCEEDED, none failed some other
    way; then no mesh is serving a request or waiting for a reply, and no
    request or nested-call task is left."""
    tree = small_tree
    await poll(lambda: not leftovers(tree), 2.0, lambda: f"not clean before: {leftovers(tree)}")
    tree.recorder.clear()
    root = build_tree(SMALL, tree.agents, leaf_s=leaf_ms / 1000)
    before = time.time()
    task = asyncio.create_task(
        tree.caller.request(tree.agents[0], "node", root, Done, timeout=deadline_ms / 1000)
    )
    await asyncio.wait((task,), timeout=cancel_ms / 1000)
    cut = time.time()  # when the caller's task is cancelled (unless it is already done)
    task.cancel()
    try:
        outcome: object = await task
    except asyncio.CancelledError:
        outcome = "cancelled"
    except mesh.DeadlineExceeded:
        outcome = "deadline"
    cut = min(cut, before + deadline_ms / 1000)  # whichever came first
    event(f"caller: {'reply' if isinstance(outcome, Done) else outcome}")

    def settled() -> bool:
        rec = tree.recorder
        started = {p for _, e, p in rec.events if e == "started"}
        return not rec.live and set(rec.ended()) == started and not leftovers(tree)

    await poll(settled, 5.0, lambda: f"not settled after {outcome!r}: {leftovers(tree)}")
    ended = tree.recorder.ended()
    # A handler whose nested call met the (shared) deadline before the cancel reached it
    # ends with that call's DEADLINE_EXCEEDED: legitimate, but only once the deadline passed.
    deadline_at = before + deadline_ms / 1000
    timed_out = {
        p
        for ts, e, p in tree.recorder.events
        if e == "failed:DEADLINE_EXCEEDED" and ts >= deadline_at - 0.005
    }
    odd = {
        p: e
        for p, e in ended.items()
        if e not in ("cancelled", "finished") and not (p in timed_out and "DEADLINE" in e)
    }
    assert not odd, (outcome, odd)
    if isinstance(outcome, Done):
        assert outcome.leaves == SMALL[-1]
        assert set(ended.values()) == {"finished"} and len(ended) == sum(SMALL)
    else:
        late = {
            p: f"{e} {ts - cut:+.3f} s"
            for ts, e, p in tree.recorder.events
            if e != "started" and ts > cut + SMALL_BOUND
        }
        assert not late, (outcome, late)
