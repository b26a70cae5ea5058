"""``mesh-agent demo``: three example agents on an embedded nats-server, talking securely.

It starts nats-server (JetStream on) from the pip-installed binary, makes a throwaway trust
root and identities, starts the policy registry and applies ``policies/research.yaml``, runs
the agents of ``examples/research.py``, and narrates a short conversation: sealed
request/reply with a nested call that inherits the deadline, signed events, a deadline that is
too short, a denied call and the rule that denied it, a captured request that a broker-level
attacker replays and tampers with (refused both times), a canary rollout of the researcher's v2
by a weighted route (``policies/research-canary.yaml``: 90/10, then 0/100), a researcher
instance that fails every call and that the planner's outlier detection ejects, and the audit
log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rich.console import Console

from mesh._connect import Mesh
from mesh._core.config import DirectoryConfig, MeshConfig
from mesh._core.envelope import decode_frame, encode_header
from mesh._core.identity import TrustRoot, save_identity, save_trust_root
from mesh._core.names import rpc_prefix
from mesh._core.policy import PolicyEngine, parse_policy
from mesh._runtime.agent import Agent
from mesh._transport.nats import NatsTransport
from mesh.control_plane import ApplyReply, ApplyRequest
from mesh.embedded import NatsServer
from mesh.errors import DeadlineExceeded, MeshError, PermissionDenied

from .observe import fetch_signals, render_graph, render_top

QUESTIONS = ["How do NATS subjects work?", "What does a service mesh give me?"]


def say(line: str = "") -> None:
    print(line, flush=True)


async def _attack(url: str, planner: Mesh) -> None:
    """A client with broker access but no mesh keys captures a request and replays it."""
    spy = NatsTransport([url], name="attacker")
    await spy.connect()
    try:
        await _capture_and_replay(spy, planner)
    finally:
        await spy.close()


async def _capture_and_replay(spy: NatsTransport, planner: Mesh) -> None:
    """The attacker's connection captures the planner's next request, then resends it as it is
    and with a fresh message id."""
    from mesh_examples.research import Answer, Question

    captured: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
    refusals: asyncio.Queue[bytes] = asyncio.Queue()

    async def capture(msg: object) -> None:
        captured.put_nowait((msg.subject, msg.data, dict(msg.headers or {})))  # type: ignore[attr-defined]

    async def refused(msg: object) -> None:
        refusals.put_nowait(msg.data)  # type: ignore[attr-defined]

    await spy.subscribe(f"{rpc_prefix(planner.config.prefix)}researcher.>", capture)
    inbox = spy.new_inbox()
    await spy.subscribe(inbox, refused)
    await spy.flush()  # the server has both subscriptions (NatsTransport.flush)
    await planner.request("researcher", "answer", Question(text="nats"), Answer, timeout=5)
    subject, frame, headers = await asyncio.wait_for(captured.get(), 5)
    say(
        f"attacker   captured {len(frame)} bytes on {subject}: the body is ciphertext "
        f"({frame[-24:].hex()[:32]}...)"
    )
    # To get past the replay check the attacker gives the copy a fresh message id; the id is
    # part of the sealed header, so the seal no longer verifies.
    header, body_at = decode_frame(frame)
    header.id = os.urandom(16)
    renamed = encode_header(header) + frame[body_at:]
    for label, data in (("replays it", frame), ("gives it a fresh id and resends", renamed)):
        await spy.publish(subject, data, reply=inbox, headers=headers)
        hdr, _ = decode_frame(await asyncio.wait_for(refusals.get(), 5))
        say(f"attacker   {label}: refused {hdr.status} ({hdr.message})")


def _trace_lines(spans: Sequence[ReadableSpan], trace_id: int) -> list[str]:
    """The spans of one trace as an indented tree, parents first."""
    mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in mine:
        children.setdefault(s.parent.span_id if s.parent else None, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            ms = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
            attrs = s.attributes or {}
            who = attrs.get("mesh.caller", "")
            side = "client" if s.kind == SpanKind.CLIENT else "server"
            code = attrs.get("rpc.natsmesh.status_code", "")
            lines.append(f"  {'  ' * depth}{s.name} [{side} of {who}] {code} {ms:.2f} ms")
            assert s.context is not None
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return lines


def _policy_text(name: str = "research.yaml") -> tuple[str, str]:
    """A policy of the demo: ``policies/research.yaml`` by default (installed as
    ``mesh_policies``)."""
    text = resources.files("mesh_policies").joinpath(name).read_text()
    return text, f"policies/{name}"


async def _apply(admin: Mesh, meshes: Sequence[Mesh], text: str, source: str) -> ApplyReply:
    """The admin applies a policy through the registry, which signs and distributes it; returns
    once every mesh of ``meshes`` runs the new revision."""
    applied = await admin.request(
        "registry", "apply", ApplyRequest(policy=text, source=source), ApplyReply
    )
    say(f"admin      -> registry.apply({source}): revision {applied.revision}, signed")
    for mesh in meshes:
        await mesh.governance.wait_for_revision(applied.revision)
    return applied


async def _intruder(config: MeshConfig, root: TrustRoot, res: Mesh) -> None:
    """An agent with a valid certificate but no rule that lets it in."""
    from mesh_examples.research import Answer, Question

    async with Mesh(root.issue_identity("intruder"), config) as intruder:
        await intruder.wait_for("researcher")
        say("intruder   -> researcher.answer (valid certificate, but no rule allows it)")
        try:
            await intruder.request("researcher", "answer", Question(text="secrets"), Answer)
        except PermissionDenied as exc:
            say(f"intruder   <- refused by its own mesh library, no round trip: {exc.message}")
        # A client that skips its own check is refused by the callee, which names the rule.
        intruder.governance.engine = PolicyEngine(None)
        try:
            await intruder.request("researcher", "answer", Question(text="secrets"), Answer)
        except PermissionDenied as exc:
            say(f"intruder   <- refused by researcher: PERMISSION_DENIED, rule {exc.rule!r}")
    await asyncio.sleep(0.2)  # the denial report reaches the registry's audit log


def _researcher_v2() -> tuple[Agent, Agent]:
    """Version 2.0.0 of the researcher (the example's own ``answer`` handler), and the same
    version with a bug: its ``answer`` raises on every call."""
    from mesh_examples.research import answer, researcher

    v2 = Agent("researcher", version="2.0.0", description=researcher.description)
    v2.endpoint(idempotent=True, concurrency=8)(answer)
    buggy = Agent("researcher", version="2.0.0", description=researcher.description)

    @buggy.endpoint(idempotent=True, concurrency=8)
    @functools.wraps(answer)  # the same endpoint: its name, and its body and reply types
    async def broken(q: Any, ctx: Any) -> Any:
        raise RuntimeError("a bug in this instance")

    return v2, buggy


async def _start_researcher(
    root: TrustRoot,
    config: MeshConfig,
    extra: contextlib.AsyncExitStack,
    plan: Mesh,
    agent: Agent,
) -> Mesh:
    """One more researcher instance, with a fresh identity from the demo's root and stopped
    with the demo; returns once the planner's directory lists it."""
    identity = root.issue_identity("researcher", roles=["analyst"])
    mesh = await extra.enter_async_context(Mesh(identity, config, agent=agent))
    key = f"researcher.{mesh.instance}"
    for _ in range(250):  # 5 s
        if any(r.key == key for r in plan.directory.instances("researcher")):
            return mesh
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the planner's directory does not list {key}")


def _served(researchers: Sequence[Mesh]) -> Counter[str]:
    """Requests each researcher instance was sent, by instance."""
    return Counter({m.instance: m.endpoint_stats["answer"].requests for m in researchers})


async def _batch(plan: Mesh, n: int) -> int:
    """``n`` questions from the planner, ten at a time; returns how many failed."""
    from mesh_examples.research import Answer, Question

    async def ask(i: int) -> None:
        q = Question(text=QUESTIONS[i % len(QUESTIONS)])
        await plan.request("researcher", "answer", q, Answer, timeout=5)

    failed = 0
    for start in range(0, n, 10):
        done = await asyncio.gather(
            *(ask(i) for i in range(start, min(n, start + 10))), return_exceptions=True
        )
        for outcome in done:
            if isinstance(outcome, MeshError):
                failed += 1
            elif isinstance(outcome, BaseException):
                raise outcome
    return failed


async def _split_batch(plan: Mesh, n: int, split: str, versions: dict[Mesh, str]) -> None:
    """``n`` questions, and the instances (named by version) that answered them."""
    before = _served(list(versions))
    failed = await _batch(plan, n)
    got = _served(list(versions)) - before
    shares = ", ".join(f"{got[m.instance]} to {v}" for m, v in versions.items())
    say(f"planner    -> researcher.answer x{n} (split {split}): {shares}; {failed} failed")


async def _traffic(
    root: TrustRoot,
    config: MeshConfig,
    extra: contextlib.AsyncExitStack,
    admin: Mesh,
    meshes: Sequence[Mesh],
    res: Mesh,
    plan: Mesh,
) -> None:
    """A canary rollout of the researcher's v2 by a weighted route, then a v2 instance that
    fails every call, which the planner's outlier detection ejects."""
    from mesh_examples import research

    research.narrate = lambda line: None  # hundreds of calls: counted, not told one by one
    try:
        v2_agent, buggy_agent = _researcher_v2()
        v2 = await _start_researcher(root, config, extra, plan, v2_agent)
        v1_name, v2_name = f"v{research.researcher.version}", f"v{v2_agent.version}"
        say(f"canary     researcher {v2_name} starts as instance {v2.instance}, next to {v1_name}")
        text, source = _policy_text("research-canary.yaml")
        await _apply(admin, (*meshes, v2), text, source)
        policy = parse_policy(text, source=source, require_units=True)
        route = policy.spec.routes[0]
        split = ", ".join(f"{b.weight} % to {b.describe()}" for b in route.split)
        say(f"  route {route.name!r}: planner -> researcher.answer, {split}")
        outliers = policy.spec.endpoints["researcher.answer"].outlier_detection
        assert outliers is not None
        failures = outliers.consecutive_failures
        say(f"  researcher.answer: an instance that fails {failures} calls in a row is ejected")
        versions = {res: v1_name, v2: v2_name}
        await _split_batch(plan, 100, "90/10", versions)
        # The rollout goes on: the same file with the weights moved, applied as the next revision.
        doc = yaml.safe_load(text)
        for backend in doc["spec"]["routes"][0]["split"]:
            backend["weight"] = 100 if backend["version"] == "2.*" else 0
        say("admin      moves the split to 0 % version 1.*, 100 % version 2.*")
        edited = yaml.safe_dump(doc, sort_keys=False)
        await _apply(admin, (*meshes, v2), edited, f"{source}, edited to 0/100")
        await _split_batch(plan, 50, "0/100", versions)
        say()
        buggy = await _start_researcher(root, config, extra, plan, buggy_agent)
        say(
            f"outliers   a third researcher instance starts: {buggy.instance}, {v2_name} too, "
            "but its answer handler raises on every call"
        )
        await _eject(plan, buggy, failures)
    finally:
        await asyncio.sleep(0.1)  # the events of the last calls are handled, untold
        research.narrate = say


async def _eject(plan: Mesh, buggy: Mesh, failures: int) -> None:
    """Calls go on until the planner ejects ``buggy``; then none reaches it, and all succeed."""
    from mesh_examples.research import Answer, Question

    traffic = plan.client.traffic
    say("planner    -> researcher.answer, one call after another")
    calls = 0
    while not traffic.ejected() and calls < 50:
        calls += 1
        try:
            await plan.request("researcher", "answer", Question(text="nats"), Answer, timeout=5)
        except MeshError as exc:
            say(f"planner    <- call {calls}: {exc.code} ({exc.message})")
    ejected = traffic.ejected()
    if not ejected:
        say(f"planner    ejected no instance in {calls} calls")
    for key, left in ejected.items():
        say(
            f"planner    ejected {key} after {failures} failures in a row, for {left:.0f}s "
            f"(client.traffic.ejected(); counts {traffic.counts})"
        )
    n = 30
    before = _served((buggy,))
    failed = await _batch(plan, n)
    sent = (_served((buggy,)) - before)[buggy.instance]
    say(
        f"planner    -> researcher.answer x{n} after the ejection: {n - failed} OK, "
        f"{failed} failed; {sent} sent to the ejected instance"
    )


async def run_demo(*, keep: bool = False, gateway: int | None = None) -> int:
    """Run the demo; returns the process exit code.

    Its throwaway trust root and identities live in a temporary folder, deleted at the end
    (Ctrl-C included); with ``keep`` the mesh stays up until Ctrl-C and the folder remains.
    With ``gateway`` (a port; 0: a free one, implies ``keep``) the HTTP gateway serves it
    there (``mesh.cli.demo_gateway``).
    """
    keep = keep or gateway is not None
    keys = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    try:
        return await _run_demo(keys, keep=keep, gateway=gateway)
    finally:
        if keep:
            say(f"the demo's trust root and identities are kept in {keys}")
        else:
            shutil.rmtree(keys, ignore_errors=True)


async def _run_demo(keys: Path, *, keep: bool, gateway: int | None = None) -> int:
    from mesh_agents.registry import registry
    from mesh_examples import research
    from mesh_examples.research import Answer, Question, librarian, planner, researcher

    research.narrate = say
    async with NatsServer() as server:
        say(f"embedded nats-server with JetStream at {server.url}")
        root = TrustRoot.generate()
        save_trust_root(root, keys)
        ids = {
            "registry": root.issue_identity("registry", roles=["registry"]),
            "admin": root.issue_identity("admin", roles=["admin"]),
            "librarian": root.issue_identity("librarian", roles=["knowledge"]),
            "researcher": root.issue_identity("researcher", roles=["analyst"]),
            "planner": root.issue_identity("planner", roles=["coordinator"]),
        }
        for name, identity in ids.items():
            save_identity(identity, keys / name)
        say(f"trust root {root.key_id}; identities issued into {keys} (key files 0600)")
        for name, identity in ids.items():
            c = identity.certificate
            say(f"  {name:<10} instance {c.instance} serial {c.serial[:12]}… roles {list(c.roles)}")
        config = MeshConfig(
            servers=(server.url,),
            directory=DirectoryConfig(heartbeat=1.0, ttl=4.0, drain_grace=0.1),
            signals_interval=0.5,
        )
        spans = InMemorySpanExporter()
        tracing = TracerProvider()
        tracing.add_span_processor(SimpleSpanProcessor(spans))
        async with (
            Mesh(ids["registry"], config, agent=registry, trust_root=root),
            Mesh(ids["admin"], config) as admin,
            Mesh(ids["librarian"], config, agent=librarian, tracer_provider=tracing) as lib,
            Mesh(ids["researcher"], config, agent=researcher, tracer_provider=tracing) as res,
            Mesh(ids["planner"], config, agent=planner, tracer_provider=tracing) as plan,
            contextlib.AsyncExitStack() as extra,  # the agents started later, stopped first
        ):
            await admin.wait_for("registry")
            await admin.directory.watch_all(5)  # it lists every agent below
            await _apply(admin, (lib, res, plan), *_policy_text())
            await asyncio.sleep(0.1)  # acknowledgements reach the directory
            await plan.wait_for("researcher")
            await res.wait_for("librarian")
            say("directory (signed records in JetStream KV 'mesh-directory'):")
            for rec in sorted(admin.directory.all(), key=lambda r: r.agent):
                say(
                    f"  {rec.agent:<10} {rec.instance} v{rec.version} policy revision "
                    f"{rec.policy_revision} endpoints {sorted(rec.endpoints)}"
                )
            say()
            for q in QUESTIONS:
                say(f"planner    -> researcher.answer({q!r}) sealed, deadline 5s")
                t0 = time.perf_counter()
                ans = await plan.request(
                    "researcher", "answer", Question(text=q), Answer, timeout=5
                )
                ms = (time.perf_counter() - t0) * 1000
                say(f"planner    <- OK in {ms:.1f} ms: {ans.text[:70]!r} sources {ans.sources}")
                await asyncio.sleep(0.05)  # let the events print in order
                say()
            say("planner    -> researcher.answer with a 1 ms deadline")
            try:
                await plan.request(
                    "researcher", "answer", Question(text="too fast"), Answer, timeout=0.001
                )
                say("planner    <- unexpectedly answered")
            except DeadlineExceeded as exc:
                say(f"planner    <- {type(exc).__name__}: {exc.message}")
            say()
            await _intruder(config, root, res)
            say()
            try:
                await _attack(server.url, plan)
            except (MeshError, TimeoutError) as exc:
                say(f"attacker demo failed: {exc}")
                return 1
            await asyncio.sleep(0.1)
            say()
            refused = sum(res.stats.refused.values())
            say(f"researcher refused {refused} message(s): {res.stats.refused}")
            first = next(
                s
                for s in spans.get_finished_spans()
                if s.parent is None and s.name == "researcher/answer"
            )
            assert first.context is not None
            say(
                f"trace {first.context.trace_id:032x} of the first question (OpenTelemetry; "
                "`mesh-agent run --traces console|otlp` exports them):"
            )
            for line in _trace_lines(spans.get_finished_spans(), first.context.trace_id):
                say(line)
            say()
            try:
                await _traffic(root, config, extra, admin, (lib, res, plan), res, plan)
            except (MeshError, TimeoutError) as exc:
                say(f"traffic demo failed: {exc}")
                return 1
            say()
            await asyncio.sleep(config.signals_interval + 0.3)  # the last signal reports
            signals = await fetch_signals(admin, "server", True)
            say("`mesh-policy top` (golden signals the agents reported to the registry):")
            Console(width=110).print(render_top(signals))
            say("`mesh-policy graph` (also --format dot|mermaid|svg|png):")
            say(render_graph(signals, "text", None))
            records, problems = await admin.control.read_audit()
            say(
                f"audit log ({len(records)} signed, hash-chained records; "
                f"{'verified' if not problems else 'PROBLEMS: ' + '; '.join(problems)}):"
            )
            for entry in records[-4:]:
                say(f"  {entry.seq:>3} {entry.kind:<22} {entry.actor:<28} {entry.subject}")
            if gateway is not None:
                from mesh_examples.streaming import writer

                from .demo_gateway import start_gateway

                say()
                await extra.aclose()  # the canary's researchers (one fails every call) stop
                await start_gateway(
                    extra, root=root, config=config, admin=admin, meshes=(lib, res, plan),
                    keys=keys, port=gateway, writer=writer, apply=_apply, say=say,
                )  # fmt: skip
            if keep:
                say(f"mesh is up: NATS at {server.url}, identities in {keys}; Ctrl-C to stop")
                say(
                    f"  try: MESH_SERVERS={server.url} MESH_IDENTITY={keys / 'admin'} "
                    "mesh-policy agents"
                )
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
                with contextlib.suppress(asyncio.CancelledError):
                    await stop.wait()
        say("demo finished: all agents drained and deregistered")
    return 0
