"""``mesh-agent demo``: three example agents on an embedded nats-server, talking securely.

It starts nats-server (JetStream on) from the pip-installed binary, makes a throwaway trust
root and identities, starts the policy registry and applies ``policies/research.yaml``, runs
the agents of ``examples/research.py``, and narrates a short conversation: sealed
request/reply with a nested call that inherits the deadline, signed events, a deadline that is
too short, a denied call and the rule that denied it, a captured request that a broker-level
attacker replays and tampers with (refused both times), and the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

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
from mesh._core.policy import PolicyEngine
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
    from mesh_examples.research import Answer, Question

    spy = NatsTransport([url], name="attacker")
    await spy.connect()
    captured: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
    refusals: asyncio.Queue[bytes] = asyncio.Queue()

    async def capture(msg: object) -> None:
        captured.put_nowait((msg.subject, msg.data, dict(msg.headers or {})))  # type: ignore[attr-defined]

    async def refused(msg: object) -> None:
        refusals.put_nowait(msg.data)  # type: ignore[attr-defined]

    await spy.subscribe(f"{rpc_prefix(planner.config.prefix)}researcher.>", capture)
    inbox = spy.new_inbox()
    await spy.subscribe(inbox, refused)
    await spy.flush()
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
    await spy.close()


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


def _policy_text() -> tuple[str, str]:
    """The demo's policy: ``policies/research.yaml`` (installed as ``mesh_policies``)."""
    text = resources.files("mesh_policies").joinpath("research.yaml").read_text()
    return text, "policies/research.yaml"


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


async def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the process exit code.

    Its throwaway trust root and identities live in a temporary folder, deleted at the end
    (Ctrl-C included); with ``keep`` the mesh stays up until Ctrl-C and the folder remains.
    """
    keys = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    try:
        return await _run_demo(keys, keep=keep)
    finally:
        if keep:
            say(f"the demo's trust root and identities are kept in {keys}")
        else:
            shutil.rmtree(keys, ignore_errors=True)


async def _run_demo(keys: Path, *, keep: bool) -> int:
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
        ):
            await admin.wait_for("registry")
            text, source = _policy_text()
            applied = await admin.request(
                "registry", "apply", ApplyRequest(policy=text, source=source), ApplyReply
            )
            say(f"admin      -> registry.apply({source}): revision {applied.revision}, signed")
            for mesh in (lib, res, plan):
                await mesh.governance.wait_for_revision(applied.revision)
            await asyncio.sleep(0.1)  # acknowledgements reach the directory
            await plan.wait_for("researcher")
            await res.wait_for("librarian")
            say("directory (signed records in JetStream KV 'mesh-directory'):")
            for rec in sorted(plan.directory.all(), key=lambda r: r.agent):
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
