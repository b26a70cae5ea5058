"""What traffic management shows, on a real nats-server: span events and attributes for faults
and circuits, the metrics of events, circuit states and ejections, and the caller-side
access-log line of an injected fault."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

import mesh
from mesh._core.policy import PolicyEngine
from mesh.cli._agents import list_agents
from mesh.cli.observe import fetch_signals
from mesh.control_plane import TrustRoot
from mesh.testing import NatsServer, Trust, test_config, wait_until, watching_all
from mesh_agents import registry as reg

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: traffic-signals}
spec:
  defaults: {authorization: allow, access_log: true}
  endpoints:
    back.*:
      circuit_breaker: {consecutive_failures: 2, open_for: 30s}
      outlier_detection: {consecutive_failures: 2}
  routes:
    - name: chaos
      match: {agent: back, metadata: {chaos: "yes"}}
      fault: {abort: {percent: 100, code: UNAVAILABLE}}
"""


class Text(BaseModel):
    text: str


def failing_back(name: str = "back") -> mesh.Agent:
    back = mesh.Agent(name)

    @back.endpoint()
    async def leaf(t: Text) -> Text:
        raise RuntimeError("always fails")

    return back


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, object], float]]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        (dict(p.attributes or {}), p.value)  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for p in metric.data.data_points
    ]


async def test_faults_circuits_and_ejections_show_in_spans_metrics_and_the_access_log(
    nats_server: NatsServer, trust: Trust, capsys: pytest.CaptureFixture[str]
) -> None:
    """An injected abort: a span with ``mesh.fault`` and a ``fault_abort`` event, and a
    client-side access line naming the route; two failures: the circuit opens (a span event,
    ``mesh.circuit.state`` open), the instance is ejected (``mesh.outlier.ejected``); the next
    call fails fast with CircuitOpen, the fate ``circuit_open``, a ``circuit_rejected`` event
    and a client-side access line naming the destination."""
    exporter = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    async with (
        mesh.Mesh(trust.identity("back"), cfg, agent=failing_back()) as b,
        mesh.Mesh(
            trust.identity("alice"), cfg, tracer_provider=tracer, meter_provider=meters
        ) as alice,
    ):
        alice.governance.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
        await alice.wait_for("back")
        capsys.readouterr()
        with pytest.raises(mesh.Unavailable, match="fault injected by route 'chaos'") as info:
            await alice.request("back", "leaf", Text(text="x"), Text, metadata={"chaos": "yes"})
        assert info.value.rule == "chaos"
        access = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(a["side"], a["fault"], a["code"], a["rule"], a["callee"]) for a in access] == [
            ("client", "abort", "UNAVAILABLE", "chaos", "back")
        ]
        for _ in range(2):
            with pytest.raises(mesh.Internal):
                await alice.request("back", "leaf", Text(text="x"), Text)
        capsys.readouterr()
        with pytest.raises(mesh.CircuitOpen, match=r"the circuit to back \(back\.\*\) is open"):
            await alice.request("back", "leaf", Text(text="x"), Text)
        refused = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(a["side"], a["circuit"], a["destination"], a["code"]) for a in refused] == [
            ("client", "open", "back (back.*)", "UNAVAILABLE")
        ]
        events = dict(((a["mesh.event"], v) for a, v in points(reader, "mesh.traffic.events")))
        states = [
            (a["mesh.destination"], a["mesh.state"])
            for a, _ in points(reader, "mesh.circuit.state")
        ]
        ejected = points(reader, "mesh.outlier.ejected")
        key = f"back.{b.instance}"
    assert events == {"fault_abort": 1, "circuit_opened": 1, "circuit_rejected": 1, "ejected": 1}
    assert states == [("back (back.*)", "open")]
    assert [a["mesh.peer_instance"] for a, _ in ejected] == [key]
    assert 0 < ejected[0][1] <= 30
    spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert len(spans) == 4
    faulted, _first, opened, rejected = spans
    assert faulted.attributes is not None and faulted.attributes["mesh.fault"] == "abort"
    assert [e.name for e in faulted.events] == ["fault_abort"]
    assert [e.name for e in opened.events] == ["ejected", "circuit_opened"]  # inner stage first
    assert rejected.attributes is not None and rejected.attributes["mesh.fate"] == "circuit_open"
    assert [e.name for e in rejected.events] == ["circuit_rejected"]


async def test_agents_and_top_show_which_caller_ejected_which_instance(
    nats_server: NatsServer,
) -> None:
    """A caller ejects a failing instance and opens its circuit to another agent: its next
    signals report carries both; the registry's signals (what `top` prints) list them, and
    `agents` marks the ejected instance with the caller that ejected it."""
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url], signals_interval=0.2, retry=mesh.RetryPolicy(attempts=1))
    admin_cfg = watching_all(test_config([nats_server.url], signals_interval=0))
    policy = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: ejections}
spec:
  defaults: {authorization: allow}
  endpoints:
    back.*: {outlier_detection: {consecutive_failures: 2}}
    flaky.*: {circuit_breaker: {consecutive_failures: 2, open_for: 30s}}
"""
    good, bad = mesh.Agent("back"), failing_back()

    @good.endpoint()
    async def leaf(t: Text) -> Text:
        return t

    async with (
        mesh.Mesh(
            root.issue_identity("registry", roles=["registry"]), cfg, agent=reg.registry,
            trust_root=root,
        ),
        mesh.Mesh(root.issue_identity("admin", roles=["admin"]), admin_cfg) as admin,
        mesh.Mesh(root.issue_identity("back"), cfg, agent=good),
        mesh.Mesh(root.issue_identity("back"), cfg, agent=bad) as b_bad,
        mesh.Mesh(root.issue_identity("flaky"), cfg, agent=failing_back("flaky")),
        mesh.Mesh(root.issue_identity("alice"), cfg) as alice,
    ):  # fmt: skip
        alice.governance.engine = PolicyEngine(mesh.parse_policy(policy), revision=1)
        await wait_until(lambda: len(alice.directory.instances("back")) == 2, 10)
        await alice.wait_for("flaky")
        while not alice.traffic.ejected():
            with contextlib.suppress(mesh.Internal):
                await alice.request("back", "leaf", Text(text="x"), Text)
        for _ in range(2):
            with pytest.raises(mesh.Internal):
                await alice.request("flaky", "leaf", Text(text="x"), Text)
        ejected, caller = f"back.{b_bad.instance}", f"alice.{alice.instance}"
        await admin.wait_for("registry")

        async def traffic() -> list[tuple[str, str, str, str]]:
            reply = await fetch_signals(admin, "client", False)
            return [(t.caller, t.kind, t.target, t.state) for t in reply.traffic]

        want = [
            (caller, "circuit", "flaky (flaky.*)", "open"),
            (caller, "ejection", ejected, "ejected"),
        ]
        for _ in range(50):
            if await traffic() == want:
                break
            await asyncio.sleep(0.1)
        assert await traffic() == want
        rows = {row.record.key: row.ejected_by for row in await list_agents(admin)}
    assert rows[ejected] == (caller,)
    assert [k for k, by in rows.items() if by] == [ejected]
