"""Traffic management on real nats-server processes, as a user drives it: policy ``spec.routes``
(weighted splits, metadata matches, affinity, per-route timeouts, mirrors, injected faults) and
the per-destination settings of ``spec.endpoints`` (circuit breakers, concurrency limits,
outlier ejection).

Where it matters (splits, ejections) the callee instances are separate ``mesh-agent run``
processes (``traffic_workers.py``); elsewhere they run in-process, so that a test can count
what each handler saw. Statistical checks allow 5 standard deviations of the binomial count.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any, TypeAlias

import pytest

import mesh
from mesh._core.policy import PolicyEngine
from mesh.control_plane import ApplyReply, ApplyRequest
from mesh.testing import NatsServer, Trust, test_config, wait_until, watching_all
from mesh_agents import registry as reg

from .cli_helpers import base_env, run_sync
from .traffic_workers import A, Q

REPO = Path(__file__).resolve().parents[2]
MESH_AGENT = str(Path(sys.executable).parent / "mesh-agent")
WORKER = "tests.integration.traffic_workers:researcher"
SDS = 5.0  # the tolerance of a binomial count, in standard deviations

Outcome: TypeAlias = A | mesh.MeshError


def within(count: int, n: int, percent: float) -> bool:
    """Whether ``count`` of ``n`` draws is within ``SDS`` standard deviations of ``percent``."""
    p = percent / 100
    return abs(count - n * p) <= SDS * math.sqrt(n * p * (1 - p))


def install(text: str, *meshes: mesh.Mesh) -> None:
    """Install a policy in callers directly, as if the registry had distributed it."""
    engine = PolicyEngine(mesh.parse_policy(text), revision=1)
    for m in meshes:
        m.governance.engine = engine


def config(url: str, attempts: int = 1) -> mesh.MeshConfig:
    return test_config([url], retry=mesh.RetryPolicy(attempts=attempts))


async def ask(
    caller: mesh.Mesh,
    n: int = 0,
    *,
    agent: str = "researcher",
    metadata: dict[str, str] | None = None,
    timeout: float | None = None,
    sleep_ms: int = 0,
) -> Outcome:
    """One call of ``agent.answer``: its reply, or the error it raised."""
    try:
        return await caller.request(
            agent, "answer", Q(n=n, sleep_ms=sleep_ms), A, metadata=metadata, timeout=timeout
        )
    except mesh.MeshError as exc:
        return exc


async def timed(caller: mesh.Mesh, n: int = 0, **kw: Any) -> tuple[float, Outcome]:
    start = time.perf_counter()
    outcome = await ask(caller, n, **kw)
    return time.perf_counter() - start, outcome


async def many(caller: mesh.Mesh, n: int, concurrency: int = 16, **kw: Any) -> list[Outcome]:
    """``n`` calls, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Outcome:
        async with sem:
            return await ask(caller, i, **kw)

    return await asyncio.gather(*(one(i) for i in range(n)))


def replies(outcomes: list[Outcome]) -> list[A]:
    """The replies of ``outcomes``, which must all be replies."""
    errors = [o for o in outcomes if not isinstance(o, A)]
    assert not errors, errors[:5]
    return [o for o in outcomes if isinstance(o, A)]


class Callee:
    """An in-process ``answer`` endpoint whose behaviour a test changes while it runs, and
    which records every call it serves (``seen``: the mirrored flag and the metadata)."""

    def __init__(
        self, name: str = "researcher", version: str = "1.0.0", labels: dict[str, str] | None = None
    ) -> None:
        self.fail: type[Exception] | None = None  # RuntimeError gives INTERNAL
        self.sleep = 0.0
        self.seen: list[tuple[bool, dict[str, str]]] = []
        self.active = self.max_active = 0
        self.agent = mesh.Agent(name, version=version, labels=dict(labels or {}))

        @self.agent.endpoint(idempotent=True, concurrency=256)
        async def answer(q: Q, ctx: mesh.Context) -> A:
            self.seen.append((ctx.mirrored, dict(ctx.metadata)))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                if self.sleep or q.sleep_ms:
                    await asyncio.sleep(self.sleep + q.sleep_ms / 1000)
                if self.fail is not None:
                    raise self.fail("failing on purpose")
                return A(
                    n=q.n,
                    agent=name,
                    version=version,
                    instance=ctx.mesh.instance,
                    mirrored=ctx.mirrored,
                    metadata=dict(ctx.metadata),
                )
            finally:
                self.active -= 1


async def serve(
    stack: AsyncExitStack, trust: Trust, cfg: mesh.MeshConfig, callee: Callee
) -> mesh.Mesh:
    """A mesh connection serving ``callee``, closed with ``stack``."""
    ident = trust.identity(callee.agent.name)
    return await stack.enter_async_context(mesh.Mesh(ident, cfg, agent=callee.agent))


async def client(
    stack: AsyncExitStack, trust: Trust, cfg: mesh.MeshConfig, name: str = "alice"
) -> mesh.Mesh:
    return await stack.enter_async_context(mesh.Mesh(trust.identity(name), cfg))


async def live(caller: mesh.Mesh, agent: str, count: int, timeout: float = 30) -> None:
    """Wait until ``caller`` sees exactly ``count`` live instances of ``agent``."""
    await wait_until(lambda: len(caller.directory.instances(agent)) == count, timeout=timeout)


# --- separate processes ---------------------------------------------------------------------


class Fleet:
    """``researcher`` instances in separate ``mesh-agent run`` processes."""

    def __init__(self, url: str, trust: Trust, tmp: Path) -> None:
        self.url, self.trust, self.tmp = url, trust, tmp
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def spawn(self, version: str = "1.0.0", *, fail: bool = False) -> str:
        """Start one instance; returns its key (``researcher.<instance>``)."""
        ident = self.trust.identity("researcher")
        d = self.tmp / f"researcher-{len(self.procs)}"
        mesh.save_identity(ident, d)
        env = base_env(
            columns=None,
            servers=self.url,
            identity=d,
            allow_no_policy="1",  # until the registry's first head, in the split test
            drain_timeout="2s",
        )
        env.update(TRAFFIC_VERSION=version, TRAFFIC_FAIL="1" if fail else "0")
        log = (d / "stderr.log").open("wb")  # not a pipe: a failing worker logs every call
        proc = subprocess.Popen(
            [MESH_AGENT, "run", WORKER, "--log-level", "error"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        self.procs.append((proc, log))
        return f"researcher.{ident.instance}"

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()


@pytest.fixture
def fleet(nats_server: NatsServer, trust: Trust, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(nats_server.url, trust, tmp_path)
    try:
        yield f
    finally:
        f.stop()


# --- 1. weighted split, and a change applied through the registry ----------------------------

SPLIT_90_10 = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: canary}
spec:
  defaults: {authorization: allow}
  routes:
    - name: canary
      match: {agent: researcher}
      split:
        - {version: 1.0.0, weight: 90}
        - {version: 2.0.0, weight: 10}
"""
ALL_TO_V2 = SPLIT_90_10.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 100")


async def apply(admin: mesh.Mesh, text: str) -> int:
    """``mesh-policy apply``: the registry signs the text as the next revision."""
    reply = await admin.request(
        "registry", "apply", ApplyRequest(policy=text, source="traffic.yaml"), ApplyReply
    )
    return reply.revision


async def acknowledged(admin: mesh.Mesh, agent: str, revision: int) -> None:
    """Wait until every instance of ``agent`` announces that it runs ``revision``."""

    def done() -> bool:
        records = [r for r in admin.directory.all() if r.agent == agent]
        return bool(records) and all(r.policy_revision == revision for r in records)

    await wait_until(done, timeout=10)


async def test_split_90_10_then_a_registry_change_moves_all_traffic_without_a_failure(
    nats_server: NatsServer, trust: Trust, fleet: Fleet
) -> None:
    """A 90/10 split of 2,000 calls over two processes lands within binomial tolerance; then,
    with calls running, a policy applied through the registry sends every call to 2.0.0 within a
    second of the caller's acknowledgement, and not one call fails."""
    fleet.spawn("1.0.0")
    fleet.spawn("2.0.0")
    root = trust.root
    cfg = config(nats_server.url)
    async with AsyncExitStack() as stack:
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
        # The caller is an agent, so that it announces the revision it runs (its ack).
        alice = await stack.enter_async_context(
            mesh.Mesh(trust.identity("alice"), cfg, agent=mesh.Agent("alice"))
        )
        await admin.wait_for("registry")
        await live(alice, "researcher", 2)
        await acknowledged(admin, "alice", await apply(admin, SPLIT_90_10))

        versions = Counter(a.version for a in replies(await many(alice, 2000, concurrency=32)))
        assert versions["1.0.0"] + versions["2.0.0"] == 2000, versions
        assert within(versions["2.0.0"], 2000, 10), versions  # 200 +- 67

        log: list[tuple[float, Outcome]] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                log.append((started, await ask(alice, timeout=5)))

        loops = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.5)
        applied = time.monotonic()
        revision = await apply(admin, ALL_TO_V2)
        await acknowledged(admin, "alice", revision)
        acked = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*loops)

    failed = [o for _, o in log if not isinstance(o, A)]
    assert failed == [], failed[:5]
    before = Counter(o.version for t, o in log if isinstance(o, A) and t < applied)
    assert before["1.0.0"] > before["2.0.0"] > 0, before  # still splitting as the change came
    last_v1 = max(t for t, o in log if isinstance(o, A) and o.version == "1.0.0")
    assert last_v1 - acked < 1.0, last_v1 - acked
    late = [o.version for t, o in log if isinstance(o, A) and t >= acked + 1.0]
    assert len(late) >= 50 and set(late) == {"2.0.0"}, Counter(late)


# --- 2. which route applies ------------------------------------------------------------------

MATCHES = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: matches}
spec:
  defaults: {authorization: allow}
  routes:
    - name: gold-to-v2
      match: {agent: researcher, metadata: {tier: gold}}
      split: [{version: 2.0.0, weight: 100}]
    - name: beta-to-canary
      match: {agent: researcher, metadata: {cohort: beta}}
      split: [{labels: {track: canary}, weight: 100}]
    - name: bob-to-v1
      match: {callers: [bob], agent: researcher}
      split: [{version: 1.0.0, weight: 100}]
"""


async def test_routes_apply_by_metadata_and_caller_and_unmatched_calls_go_anywhere(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Calls no route matches reach both versions; ``tier: gold`` and ``cohort: beta`` select
    their routes (by version, by labels; the first that matches, for bob too); bob's route does
    not apply to alice's calls."""
    cfg = config(nats_server.url)
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, Callee(version="1.0.0"))
        await serve(stack, trust, cfg, Callee(version="2.0.0", labels={"track": "canary"}))
        alice = await client(stack, trust, cfg, "alice")
        bob = await client(stack, trust, cfg, "bob")
        install(MATCHES, alice, bob)
        await live(alice, "researcher", 2)
        await live(bob, "researcher", 2)

        async def versions(caller: mesh.Mesh, md: dict[str, str] | None = None) -> Counter[str]:
            got = replies(await many(caller, 200, concurrency=1, metadata=md))
            assert all(a.metadata == (md or {}) for a in got)  # the handler sees the metadata
            return Counter(a.version for a in got)

        anywhere = await versions(alice)
        assert within(anywhere["1.0.0"], 200, 50) and anywhere["2.0.0"] > 0, anywhere
        silver = await versions(alice, {"tier": "silver"})
        assert within(silver["1.0.0"], 200, 50) and silver["2.0.0"] > 0, silver
        assert await versions(alice, {"tier": "gold"}) == {"2.0.0": 200}
        assert await versions(alice, {"cohort": "beta"}) == {"2.0.0": 200}
        assert await versions(bob) == {"1.0.0": 200}
        assert await versions(bob, {"tier": "gold", "x": "y"}) == {"2.0.0": 200}


# --- 3. circuit breaker ----------------------------------------------------------------------

CIRCUIT = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: circuit}
spec:
  defaults: {authorization: allow}
  endpoints:
    researcher.*:
      circuit_breaker: {consecutive_failures: 3, open_for: 1s}
"""
CIRCUIT_NAME = "researcher (researcher.*)"


async def test_circuit_opens_fails_fast_probes_once_and_closes(
    nats_server: NatsServer, trust: Trust
) -> None:
    """3 failures open the circuit; while open calls fail fast with CircuitOpen (UNAVAILABLE,
    a retry-after) and none reaches the callee; half open, one of 10 concurrent calls probes
    (a failing probe reopens it for longer); a successful probe closes it."""
    cfg = config(nats_server.url)
    callee = Callee()
    callee.fail = RuntimeError
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, callee)
        alice = await client(stack, trust, cfg)
        install(CIRCUIT, alice)
        await live(alice, "researcher", 1)
        traffic = alice.traffic

        for i in range(3):
            assert type(await ask(alice, i)) is mesh.Internal
        assert len(callee.seen) == 3
        assert traffic.circuits() == {CIRCUIT_NAME: "open"}
        assert traffic.counts.get("circuit_opened") == 1

        for i in range(10):
            elapsed, exc = await timed(alice, i)
            assert isinstance(exc, mesh.CircuitOpen), exc
            assert exc.code == "UNAVAILABLE" and CIRCUIT_NAME in exc.message
            assert exc.retry_after is not None and 0 < exc.retry_after <= 1.0
            assert elapsed < 0.25, elapsed  # not sent: nothing to wait for
        assert len(callee.seen) == 3
        assert traffic.counts.get("circuit_rejected") == 10

        # Half open after open_for (0.8 to 1 s with jitter): exactly one concurrent call probes.
        callee.sleep = 0.3  # the probe is still out while the others arrive
        await wait_until(lambda: traffic.circuits()[CIRCUIT_NAME] == "half_open", timeout=2)
        outcomes = await asyncio.gather(*(ask(alice, i) for i in range(10)))
        assert len(callee.seen) == 4
        assert Counter(type(o).__name__ for o in outcomes) == {"Internal": 1, "CircuitOpen": 9}
        # The probe failed: open again, for twice as long (1.6 to 2 s).
        assert traffic.circuits()[CIRCUIT_NAME] == "open"
        exc = await ask(alice)
        assert isinstance(exc, mesh.CircuitOpen) and exc.retry_after is not None
        assert 1.0 < exc.retry_after <= 2.0, exc.retry_after

        callee.fail = None  # the callee recovers
        await wait_until(lambda: traffic.circuits()[CIRCUIT_NAME] == "half_open", timeout=3)
        outcomes = await asyncio.gather(*(ask(alice, i) for i in range(10)))
        assert len(callee.seen) == 5
        assert Counter(type(o).__name__ for o in outcomes) == {"A": 1, "CircuitOpen": 9}
        assert traffic.circuits() == {CIRCUIT_NAME: "closed"}
        assert traffic.counts.get("circuit_closed") == 1
        callee.sleep = 0.0
        assert len(replies(await many(alice, 20))) == 20
        assert len(callee.seen) == 25


async def test_retries_do_not_storm_through_an_open_circuit(
    nats_server: NatsServer, trust: Trust
) -> None:
    """With 3 attempts per call on an idempotent endpoint whose callee answers UNAVAILABLE, 20
    calls one after another and then 50 at once reach the callee 3 times in all (the threshold),
    not 210: the first call's retries open the circuit, later calls fail fast and are not
    retried."""
    cfg = config(nats_server.url, attempts=3)
    callee = Callee()
    callee.fail = mesh.Unavailable
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, callee)
        alice = await client(stack, trust, cfg)
        install(CIRCUIT, alice)
        await live(alice, "researcher", 1)

        first = await ask(alice)
        assert type(first) is mesh.Unavailable, first
        assert len(callee.seen) == 3  # attempts 1 to 3, the last one opening the circuit
        rest = [await ask(alice, i) for i in range(19)]
        rest += await many(alice, 50, concurrency=50)
        assert all(isinstance(o, mesh.CircuitOpen) for o in rest), rest[:3]
        assert len(callee.seen) == 3
        fates = alice.stats.fates
        assert fates.get("retries_exhausted") == 1 and fates.get("circuit_open") == 69, fates
        assert "ok_after_retry" not in fates


# --- 4. concurrency limits of a destination --------------------------------------------------

LIMITS = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: limits}
spec:
  defaults: {authorization: allow}
  endpoints:
    researcher.answer:
      circuit_breaker: {max_concurrent: 2, max_pending: 3}
"""


async def test_max_concurrent_and_max_pending_bound_what_waits(
    nats_server: NatsServer, trust: Trust
) -> None:
    """max_concurrent 2 and max_pending 3, a callee taking 0.4 s, 10 calls at once: 5 are
    served (never more than 2 at a time), 5 fail at once with RESOURCE_EXHAUSTED naming
    max_concurrent."""
    cfg = config(nats_server.url)
    callee = Callee()
    callee.sleep = 0.4
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, callee)
        alice = await client(stack, trust, cfg)
        install(LIMITS, alice)
        await live(alice, "researcher", 1)

        results = await asyncio.gather(*(timed(alice, i) for i in range(10)))
        served = sorted(t for t, o in results if isinstance(o, A))
        refused = [(t, o) for t, o in results if isinstance(o, mesh.ResourceExhausted)]
        assert len(served) == 5 and len(refused) == 5, results
        for elapsed, exc in refused:
            assert elapsed < 0.2, elapsed
            assert "max_concurrent" in exc.message and "max_pending" in exc.message, exc
            assert exc.retry_after is not None and exc.retry_after > 0
        assert callee.max_active == 2 and len(callee.seen) == 5
        assert served[-1] >= 1.15, served  # three rounds of 0.4 s: the last waited for two
        assert alice.traffic.counts.get("pending_overflow") == 5
        assert alice.traffic.circuits() == {"researcher (researcher.answer)": "closed"}


# --- 5. outlier ejection ---------------------------------------------------------------------

EJECTION = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: ejection}
spec:
  defaults: {authorization: allow}
  endpoints:
    researcher.*:
      outlier_detection:
        consecutive_failures: 3
        base_ejection_time: 30s
        max_ejection_percent: 10
"""


async def test_an_instance_failing_every_call_is_ejected_after_its_threshold(
    nats_server: NatsServer, trust: Trust, fleet: Fleet
) -> None:
    """One of three processes fails every call: after its 3 failures it is ejected (and named
    by ``ejected()``), and the rest of 300 calls see no failure."""
    bad = fleet.spawn(fail=True)
    good = {fleet.spawn(), fleet.spawn()}
    cfg = config(nats_server.url)
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        install(EJECTION, alice)
        await live(alice, "researcher", 3)
        outcomes = [await ask(alice, i) for i in range(300)]
        traffic = alice.traffic
        assert set(traffic.ejected()) == {bad}
        assert 25 < traffic.ejected()[bad] <= 30
    failures = [i for i, o in enumerate(outcomes) if not isinstance(o, A)]
    assert len(failures) == 3, failures
    assert all(type(outcomes[i]) is mesh.Internal for i in failures)
    served = Counter(f"researcher.{o.instance}" for o in outcomes if isinstance(o, A))
    assert set(served) == good and sum(served.values()) == 297, served
    assert traffic.counts.get("ejected") == 1


async def test_no_more_instances_are_ejected_than_the_cap(
    nats_server: NatsServer, trust: Trust, fleet: Fleet
) -> None:
    """Two of three processes fail every call; max_ejection_percent 10 of 3 allows one
    ejection, so exactly one of them is ejected and the other keeps taking (failing) calls."""
    bad = {fleet.spawn(fail=True), fleet.spawn(fail=True)}
    good = fleet.spawn()
    cfg = config(nats_server.url)
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        install(EJECTION, alice)
        await live(alice, "researcher", 3)
        traffic = alice.traffic
        outcomes: list[Outcome] = []
        most = 0
        ejected_after = None
        for i in range(300):
            outcomes.append(await ask(alice, i))
            most = max(most, len(traffic.ejected()))
            if ejected_after is None and traffic.ejected():
                ejected_after = i
        ejected = set(traffic.ejected())
    assert most == 1 and len(ejected) == 1 and ejected <= bad, ejected
    assert traffic.counts.get("ejected") == 1
    assert ejected_after is not None
    later = outcomes[ejected_after + 1 :]
    # The remaining failing instance takes about half of the calls after the ejection.
    failed_later = sum(not isinstance(o, A) for o in later)
    assert within(failed_later, len(later), 50), (failed_later, len(later))
    served = {f"researcher.{o.instance}" for o in outcomes if isinstance(o, A)}
    assert served == {good}


# --- 6. mirrors ------------------------------------------------------------------------------

MIRROR_20 = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: mirror}
spec:
  defaults: {authorization: allow}
  routes:
    - name: shadow-copy
      match: {agent: researcher}
      mirror: {agent: shadow, percent: 20}
"""
MIRROR_ALL = MIRROR_20.replace("percent: 20", "percent: 100")


def mirrors_settled(m: mesh.Mesh) -> bool:
    c = m.traffic.counts
    return c.get("mirror_ok", 0) + c.get("mirror_failed", 0) == c.get("mirror_sent", 0)


async def test_a_20_percent_mirror_copies_a_fifth_of_calls_to_the_shadow(
    nats_server: NatsServer, trust: Trust
) -> None:
    """About 20 % of 1,000 calls reach the shadow, marked mirrored there (never on the
    primary) with the caller's metadata; every reply is the primary's."""
    cfg = config(nats_server.url)
    primary, shadow = Callee(), Callee("shadow")
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, primary)
        await serve(stack, trust, cfg, shadow)
        alice = await client(stack, trust, cfg)
        install(MIRROR_20, alice)
        await live(alice, "researcher", 1)
        await live(alice, "shadow", 1)

        md = {"conversation": "c-1"}
        got = replies(await many(alice, 1000, concurrency=20, metadata=md))
        assert {(a.agent, a.mirrored) for a in got} == {("researcher", False)}
        await wait_until(lambda: mirrors_settled(alice))
        counts = alice.traffic.counts
    sent = counts.get("mirror_sent", 0)
    assert within(sent, 1000, 20), sent  # 200 +- 63
    assert counts.get("mirror_ok") == sent and counts.get("mirror_failed", 0) == 0, counts
    assert len(shadow.seen) == sent
    assert all(seen == (True, md) for seen in shadow.seen)
    assert len(primary.seen) == 1000 and {m for m, _ in primary.seen} == {False}


async def test_a_failing_slow_or_absent_shadow_never_fails_or_slows_a_caller(
    nats_server: NatsServer, trust: Trust
) -> None:
    """With every call mirrored: a shadow that fails every call, one that takes 1 s and one
    that has gone leave every caller's call answered, at the primary's speed."""
    cfg = config(nats_server.url)
    primary, shadow = Callee(), Callee("shadow")
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, primary)
        shadow_mesh = await serve(stack, trust, cfg, shadow)
        alice = await client(stack, trust, cfg)
        install(MIRROR_ALL, alice)
        await live(alice, "researcher", 1)
        await live(alice, "shadow", 1)
        counts = alice.traffic.counts

        shadow.fail = RuntimeError
        assert len(replies(await many(alice, 100))) == 100
        await wait_until(lambda: mirrors_settled(alice))
        assert counts.get("mirror_failed") == 100 and len(shadow.seen) == 100

        shadow.fail, shadow.sleep = None, 1.0
        slowest = max([(await timed(alice, i))[0] for i in range(20)])
        assert slowest < 0.5, slowest  # the caller never waits for its copy
        await wait_until(lambda: mirrors_settled(alice), timeout=10)
        assert counts.get("mirror_ok") == 20

        await shadow_mesh.drain()
        await live(alice, "shadow", 0)
        assert len(replies(await many(alice, 100))) == 100
        await wait_until(lambda: mirrors_settled(alice))
        assert counts.get("mirror_failed") == 200 and counts.get("mirror_sent") == 220
        assert len(primary.seen) == 220 and len(shadow.seen) == 120


SHADOW_DEPLOYMENT = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: shadow-deployment}
spec:
  defaults: {authorization: allow}
  routes:
    - name: try-v2-in-the-shadow
      match: {agent: researcher}
      split:
        - {version: 1.0.0, weight: 100}
        - {version: 2.0.0, weight: 0}
      mirror: {agent: researcher, version: 2.0.0}
"""


async def test_a_shadow_deployment_of_the_same_agent_gets_copies_and_no_live_call(
    nats_server: NatsServer, trust: Trust
) -> None:
    """The canary recipe: 2.0.0 kept at weight 0 and mirrored to (100 % by default) gets a
    mirrored copy of each of 100 calls and not one live call; every reply is 1.0.0's."""
    cfg = config(nats_server.url)
    stable, shadow = Callee(version="1.0.0"), Callee(version="2.0.0")
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, stable)
        await serve(stack, trust, cfg, shadow)
        alice = await client(stack, trust, cfg)
        install(SHADOW_DEPLOYMENT, alice)
        await live(alice, "researcher", 2)
        got = replies(await many(alice, 100, concurrency=1))
        await wait_until(lambda: mirrors_settled(alice))
        counts = alice.traffic.counts
    assert Counter((a.version, a.mirrored) for a in got) == {("1.0.0", False): 100}
    assert counts.get("mirror_sent") == counts.get("mirror_ok") == 100
    assert [mirrored for mirrored, _ in shadow.seen] == [True] * 100
    assert [mirrored for mirrored, _ in stable.seen] == [False] * 100


# --- 7. fault injection ----------------------------------------------------------------------

FAULTS = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: faults}
spec:
  defaults: {authorization: allow}
  routes:
    - name: chaos
      match: {callers: [alice], agent: researcher}
      fault:
        delay: {percent: 30, fixed: 200ms}
        abort: {percent: 20, code: UNAVAILABLE}
"""


async def test_injected_delays_and_aborts_hit_their_share_of_the_matched_callers_calls(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Of 400 calls by alice about 30 % take the injected 200 ms and about 20 % fail at once
    with the configured code and the route as their rule, never reaching the callee; bob, whom
    the route does not match, sees no fault."""
    cfg = config(nats_server.url)
    callee = Callee()
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, callee)
        alice = await client(stack, trust, cfg, "alice")
        bob = await client(stack, trust, cfg, "bob")
        install(FAULTS, alice, bob)
        await live(alice, "researcher", 1)
        await live(bob, "researcher", 1)

        sem = asyncio.Semaphore(10)

        async def one(caller: mesh.Mesh, i: int) -> tuple[float, Outcome]:
            async with sem:
                return await timed(caller, i)

        results = await asyncio.gather(*(one(alice, i) for i in range(400)))
        bobs = await asyncio.gather(*(one(bob, i) for i in range(200)))

    aborted = [o for _, o in results if not isinstance(o, A)]
    assert within(len(aborted), 400, 20), len(aborted)  # 80 +- 40
    for exc in aborted:
        assert type(exc) is mesh.Unavailable and exc.code == "UNAVAILABLE", exc
        assert exc.rule == "chaos" and "chaos" in exc.message, exc
    delayed = alice.traffic.counts.get("fault_delay", 0)
    assert within(delayed, 400, 30), delayed  # 120 +- 46
    slow = sum(t >= 0.2 for t, _ in results)
    assert delayed <= slow <= delayed + 20, (delayed, slow)  # each counted delay was real
    assert alice.traffic.counts.get("fault_abort") == len(aborted)
    assert len(callee.seen) == 400 - len(aborted) + 200  # an abort is never sent
    assert all(isinstance(o, A) for _, o in bobs)
    assert bob.traffic.counts == {}


# --- 8. consistent-hash affinity -------------------------------------------------------------

AFFINITY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: affinity}
spec:
  defaults: {authorization: allow}
  routes:
    - name: sticky
      match: {agent: researcher}
      hash_on: metadata.conversation
"""


async def test_a_conversation_stays_on_one_instance_and_moves_once_when_it_stops(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Of three instances, every call of one conversation lands on one while it lives; when
    that one drains, the conversation moves to another and stays there, and conversations on
    the others do not move."""
    cfg = config(nats_server.url)
    async with AsyncExitStack() as stack:
        servers = {}
        for _ in range(3):
            m = await serve(stack, trust, cfg, Callee())
            servers[m.instance] = m
        alice = await client(stack, trust, cfg)
        install(AFFINITY, alice)
        await live(alice, "researcher", 3)

        async def homes(keys: list[str], each: int) -> dict[str, set[str]]:
            calls = [(k, i) for k in keys for i in range(each)]
            got = await asyncio.gather(
                *(ask(alice, i, metadata={"conversation": k}) for k, i in calls)
            )
            out: dict[str, set[str]] = {k: set() for k in keys}
            for (k, _), a in zip(calls, replies(list(got)), strict=True):
                out[k].add(a.instance)
            return out

        keys = [f"conversation-{i}" for i in range(30)]
        before = await homes(keys, 10)
        assert all(len(v) == 1 for v in before.values()), before
        home = {k: next(iter(v)) for k, v in before.items()}
        assert len(set(home.values())) == 3, Counter(home.values())  # the keys spread

        gone = home[keys[0]]
        await servers[gone].drain()
        await live(alice, "researcher", 2)
        after = await homes(keys, 10)
        assert all(len(v) == 1 for v in after.values()), after
        moved = {k: next(iter(v)) for k, v in after.items()}
        assert moved[keys[0]] != gone
        for k in keys:
            assert moved[k] == home[k] or home[k] == gone, (k, home[k], moved[k])
        again = await homes([keys[0]], 20)
        assert again == {keys[0]: {moved[keys[0]]}}


# --- 9. per-route timeout --------------------------------------------------------------------

AFFINE_SPLIT = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: affine-split}
spec:
  defaults: {authorization: allow}
  routes:
    - name: sticky-canary
      match: {agent: researcher}
      split: [{version: "1.0.0", weight: 50}, {version: "2.0.0", weight: 50}]
      hash_on: metadata.conversation
"""


async def test_with_a_split_a_conversation_stays_on_one_version(
    nats_server: NatsServer, trust: Trust
) -> None:
    """Affinity chooses the split's backend too: every call of one conversation reaches one
    version (the draw comes from the value's hash), while the conversations spread over both;
    a call without the value is split at random."""
    cfg = config(nats_server.url)
    async with AsyncExitStack() as stack:
        for version in ("1.0.0", "2.0.0"):
            await serve(stack, trust, cfg, Callee(version=version))
        alice = await client(stack, trust, cfg)
        install(AFFINE_SPLIT, alice)
        await live(alice, "researcher", 2)
        keys = [f"conversation-{i}" for i in range(40)]
        calls = [(k, i) for k in keys for i in range(8)]
        got = await asyncio.gather(*(ask(alice, i, metadata={"conversation": k}) for k, i in calls))
        versions: dict[str, set[str]] = {k: set() for k in keys}
        for (k, _), a in zip(calls, replies(list(got)), strict=True):
            versions[k].add(a.version)
        assert all(len(v) == 1 for v in versions.values()), versions
        spread = Counter(next(iter(v)) for v in versions.values())
        assert set(spread) == {"1.0.0", "2.0.0"} and within(spread["2.0.0"], 40, 50), spread
        unkeyed = Counter(a.version for a in replies(await many(alice, 200)))
        assert within(unkeyed["2.0.0"], 200, 50), unkeyed


ROUTE_TIMEOUT = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: route-timeout}
spec:
  defaults: {authorization: allow}
  endpoints:
    researcher.answer: {timeout: 3s}
  routes:
    - name: tight
      match: {agent: researcher, metadata: {budget: tight}}
      timeout: 200ms
"""


async def test_a_route_timeout_overrides_the_endpoint_timeout(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A 0.6 s call on the route with a 200 ms timeout fails with DEADLINE_EXCEEDED after
    about 0.2 s; off the route the endpoint's 3 s timeout lets it finish."""
    cfg = config(nats_server.url)
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, Callee())
        alice = await client(stack, trust, cfg)
        install(ROUTE_TIMEOUT, alice)
        await live(alice, "researcher", 1)

        elapsed, exc = await timed(alice, metadata={"budget": "tight"}, sleep_ms=600)
        assert isinstance(exc, mesh.DeadlineExceeded), exc
        assert 0.19 <= elapsed < 0.55, elapsed
        elapsed, ok = await timed(alice, metadata={"budget": "loose"}, sleep_ms=600)
        assert isinstance(ok, A), ok
        assert 0.6 <= elapsed < 2.0, elapsed


# --- load balancing --------------------------------------------------------------------------

PEAK_EWMA = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: ewma}
spec:
  defaults: {authorization: allow}
  endpoints:
    researcher.*: {load_balancer: peak_ewma}
"""
PEAK_EWMA_WITH_CIRCUIT = PEAK_EWMA.replace(
    "{load_balancer: peak_ewma}",
    "{load_balancer: peak_ewma, circuit_breaker: {consecutive_failures: 100}}",
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(PEAK_EWMA, id="alone"),
        pytest.param(PEAK_EWMA_WITH_CIRCUIT, id="with-a-circuit-breaker"),
    ],
)
async def test_peak_ewma_steers_calls_away_from_a_slow_instance(
    text: str, nats_server: NatsServer, trust: Trust
) -> None:
    """One call at a time to a fast and a 40 ms instance: least outstanding splits them about
    evenly; peak EWMA sends the slow one almost nothing."""
    cfg = config(nats_server.url)
    fast, slow = Callee(version="1.0.0"), Callee(version="2.0.0")
    slow.sleep = 0.04
    async with AsyncExitStack() as stack:
        await serve(stack, trust, cfg, fast)
        await serve(stack, trust, cfg, slow)
        alice = await client(stack, trust, cfg)
        await live(alice, "researcher", 2)
        even = Counter(a.version for a in replies(await many(alice, 60, concurrency=1)))
        assert within(even["2.0.0"], 60, 50), even
        install(text, alice)
        steered = Counter(a.version for a in replies(await many(alice, 100, concurrency=1)))
        assert steered["2.0.0"] <= 10, steered


# --- 10. bad policies are refused with file and line -----------------------------------------

BAD = {
    "weights": (
        """
          split:
            - {version: 1.0.0, weight: 90}
            - {version: 2.0.0, weight: 20}
        """,
        "split",
        "split weights must sum to 100, not 90 + 20 = 110",
    ),
    "mirror-to-itself": (
        """
          mirror:
            agent: researcher
            percent: 10
        """,
        "mirror",
        "the mirror is the route's own agent 'researcher': name another agent, or the "
        "version or labels of a shadow deployment",
    ),
    "mirror-to-a-live-backend": (
        """
          split: [{version: 1.0.0, weight: 100}]
          mirror: {agent: researcher, version: 1.0.0}
        """,
        "mirror",
        "mirror to a shadow deployment the split does not use",
    ),
    "mirror-to-own-agent-without-a-split": (
        """
          mirror: {agent: researcher, version: 2.0.0}
        """,
        "mirror",
        "takes the route's live calls on every instance: add a split that sends none to it, "
        "or mirror to another agent",
    ),
    "percent-out-of-range": (
        """
          fault:
            abort: {percent: 150, code: UNAVAILABLE}
        """,
        "abort",
        "fault.abort.percent: invalid percentage 150: use a number from 0 to 100",
    ),
}


@pytest.mark.parametrize(("command", "exit_code"), [("validate", 1), ("apply", 2)])
@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_and_apply_refuse_a_bad_route_naming_file_line_and_fix(
    case: str, command: str, exit_code: int, tmp_path: Path
) -> None:
    """`mesh-policy validate` (exit 1) and `apply` (exit 2, before connecting: no server is
    running) say `file:line: path: problem and fix` on stderr, with no traceback."""
    body, key, message = BAD[case]
    lines = [
        "apiVersion: mesh/v1",
        "kind: Policy",
        "metadata: {name: bad}",
        "spec:",
        "  defaults: {authorization: allow}",
        "  routes:",
        "    - name: r",
        "      match: {agent: researcher}",
        *textwrap.indent(textwrap.dedent(body).strip(), "      ").splitlines(),
    ]
    path = tmp_path / f"{case}.yaml"
    path.write_text("\n".join(lines) + "\n")
    line = next(i for i, text in enumerate(lines, 1) if text.lstrip().startswith(f"{key}:"))
    env = base_env(servers="nats://127.0.0.1:1", identity=tmp_path / "nobody")
    result = run_sync("mesh-policy", command, path, env=env)
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"{path}:{line}: spec.routes[0]." in result.stderr, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
