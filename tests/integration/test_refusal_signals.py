"""Refused requests are counted like served ones, on a real nats-server: in the registry's
golden signals (`mesh-policy top`), in `mesh_requests_total`, in `$SRV.STATS`, in the access log
and as spans; and the admin CLI's own calls stay out of `top` and `graph`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.core import Metric
from pydantic import BaseModel

import mesh
from mesh._observability.metrics import MeshCollector
from mesh._observability.tracing import _one_line
from mesh.control_plane import PolicyEngine, TrustRoot
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

from .cli_helpers import base_env, run_until, table

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: refusals}
spec:
  rules:
    - name: alice-ok
      allow: {callers: [alice], agent: back}
  endpoints:
    back.leaf:
      rate_limit: {per_caller: 1/h, burst: 3}
"""


class Text(BaseModel):
    text: str


def back_agent() -> mesh.Agent:
    back = mesh.Agent("back")

    @back.endpoint()
    async def leaf(t: Text) -> Text:
        if t.text == "fail":
            raise mesh.NotFound("no such thing")
        return Text(text=t.text.upper())

    return back


@dataclass
class Scene:
    url: str
    root: TrustRoot
    admin: Path
    cfg: mesh.MeshConfig

    def identity(self, name: str, *roles: str) -> mesh.Identity:
        return self.root.issue_identity(name, roles=list(roles))


@pytest.fixture
async def scene(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Scene]:
    """A registry (in-process) collecting signals every 0.2 s, and an admin identity for the
    CLI."""
    root = TrustRoot.generate()
    admin = mesh.save_identity(root.issue_identity("admin", roles=["admin"]), tmp_path / "admin")
    cfg = test_config([nats_server.url], signals_interval=0.2, retry=mesh.RetryPolicy(attempts=1))
    async with mesh.Mesh(
        root.issue_identity("registry", roles=["registry"]),
        cfg,
        agent=reg.registry,
        trust_root=root,
    ):
        yield Scene(nats_server.url, root, admin, cfg)


def samples(metrics: list[Metric], name: str) -> dict[tuple[str, str, str], float]:
    """``(reporter, source, code) -> value`` of one Prometheus family."""
    return {
        (s.labels["mesh_reporter"], s.labels["mesh_source"], s.labels["mesh_code"]): s.value
        for m in metrics
        for s in m.samples
        if s.name == name
    }


async def srv_stats(url: str, agent: str) -> dict[str, dict[str, object]]:
    nc = await nats.connect(url)
    try:
        msg = await nc.request(f"$SRV.STATS.{agent}", b"", timeout=2)
    finally:
        await nc.close()
    return {e["name"]: e for e in json.loads(msg.data)["endpoints"]}


async def test_rate_limited_calls_count_in_top_metrics_srv_stats_and_access_log(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    """3 served and 20 rate-limited calls: `top` shows 13.0 % success, `mesh_requests_total`
    20 RESOURCE_EXHAUSTED, `$SRV.STATS` 23 requests of which 20 refused, and the access log
    one line per request with its code."""
    cfg = dataclasses.replace(scene.cfg, access_log=True)
    async with (
        mesh.Mesh(scene.identity("back"), cfg, agent=back_agent()) as b,
        mesh.Mesh(scene.identity("alice"), scene.cfg) as alice,
    ):
        b.governance.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
        await alice.wait_for("back")
        for _ in range(3):
            await alice.request("back", "leaf", Text(text="a"), Text)
        for _ in range(20):
            with pytest.raises(mesh.ResourceExhausted):
                await alice.request("back", "leaf", Text(text="a"), Text)

        metrics = list(MeshCollector(sources=lambda: [b]).collect())
        stats = (await srv_stats(scene.url, "back"))["leaf"]
        top = await run_until(
            lambda r: any(row.get("SUCCESS") == "13.0 %" for row in table(r.stdout)),
            "mesh-policy", "top", env=base_env(servers=scene.url, identity=scene.admin),
        )  # fmt: skip
    counts = samples(metrics, "mesh_requests_total")
    assert counts[("server", "alice", "RESOURCE_EXHAUSTED")] == 20
    assert counts[("server", "alice", "OK")] == 3
    assert (stats["num_requests"], stats["num_errors"]) == (23, 20)
    assert stats["last_error"] == "RESOURCE_EXHAUSTED"
    assert stats["data"] == {"replayed_from_cache": 0, "refused": {"RESOURCE_EXHAUSTED": 20}}
    rows = table(top.stdout)
    assert [r["SUCCESS"] for r in rows if r["AGENT"] == "back"] == ["13.0 %"], top.stdout
    access = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    codes = [a["code"] for a in access if a["endpoint"] == "leaf" and a["caller"] == "alice"]
    assert codes.count("OK") == 3 and codes.count("RESOURCE_EXHAUSTED") == 20


async def test_the_admin_cli_is_not_in_the_graph(scene: Scene) -> None:
    """`mesh-policy graph` run again and again shows the agents' edges, never the CLI's own
    calls to the registry."""
    env = base_env(servers=scene.url, identity=scene.admin)
    async with (
        mesh.Mesh(scene.identity("back"), scene.cfg, agent=back_agent()),
        mesh.Mesh(scene.identity("alice"), scene.cfg) as alice,
    ):
        await alice.wait_for("back")
        await alice.request("back", "leaf", Text(text="a"), Text)
        first = await run_until(lambda r: "alice" in r.stdout, "mesh-policy", "graph", env=env)
        await asyncio.sleep(0.6)  # the registry's reports of the CLI's calls, were they counted
        again = await run_until(lambda r: "alice" in r.stdout, "mesh-policy", "graph", env=env)
    assert "back" in first.stdout, first.stdout + first.stderr
    assert "admin" not in first.stdout + again.stdout, again.stdout


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_denials_make_spans_naming_the_rule(
    scene: Scene, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A denial at the callee makes a SERVER span with ERROR and `mesh.rule`; a caller-side
    denial a CLIENT span with ERROR, the rule, fate `denied`, and a client-side count."""
    provider, exporter = spans
    engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
    async with (
        mesh.Mesh(
            scene.identity("back"), scene.cfg, agent=back_agent(), tracer_provider=provider
        ) as b,
        mesh.Mesh(scene.identity("mallory"), scene.cfg, tracer_provider=provider) as mallory,
        mesh.Mesh(scene.identity("eve"), scene.cfg, tracer_provider=provider) as eve,
    ):
        b.governance.engine = engine
        eve.governance.engine = engine  # eve's own policy refuses her call
        await mallory.wait_for("back")
        with pytest.raises(mesh.PermissionDenied):
            await mallory.request("back", "leaf", Text(text="m"), Text)
        exporter.clear()
        with pytest.raises(mesh.PermissionDenied) as local:
            await eve.request("back", "leaf", Text(text="e"), Text)
        eve_codes = {(k[3], code): n for k, code, n, _ in eve.signals.totals()}
        eve_fates = dict(eve.stats.fates)
    done = exporter.get_finished_spans()
    assert [s.kind for s in done] == [SpanKind.CLIENT]  # never sent: no SERVER span
    (client,) = done
    assert client.status.status_code == StatusCode.ERROR
    assert client.attributes is not None
    assert client.attributes["error.type"] == "PERMISSION_DENIED"
    assert client.attributes["mesh.rule"] == local.value.rule
    assert client.attributes["mesh.fate"] == "denied"
    assert eve_codes == {("client", "PERMISSION_DENIED"): 1}
    assert eve_fates == {"denied": 1}


async def test_callee_denial_makes_a_server_span_with_the_rule(
    scene: Scene, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A request the callee's policy denies ends in a SERVER span with ERROR and the rule."""
    provider, exporter = spans
    async with (
        mesh.Mesh(
            scene.identity("back"), scene.cfg, agent=back_agent(), tracer_provider=provider
        ) as b,
        mesh.Mesh(scene.identity("mallory"), scene.cfg) as mallory,
    ):
        b.governance.engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
        await mallory.wait_for("back")
        with pytest.raises(mesh.PermissionDenied) as denied:
            await mallory.request("back", "leaf", Text(text="m"), Text)
    (server,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.name == "back/leaf"
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["mesh.caller"] == "mallory"
    assert server.attributes["mesh.rule"] == denied.value.rule == "default deny"


async def test_no_retry_event_without_a_retry_and_the_fate_is_an_attribute(
    scene: Scene, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A first-attempt success and a final failure record no `retry` event; each CLIENT span
    carries `mesh.fate`."""
    provider, exporter = spans
    async with (
        mesh.Mesh(scene.identity("back"), scene.cfg, agent=back_agent()),
        mesh.Mesh(scene.identity("alice"), scene.cfg, tracer_provider=provider) as alice,
    ):
        await alice.wait_for("back")
        await alice.request("back", "leaf", Text(text="a"), Text)
        with pytest.raises(mesh.NotFound):
            await alice.request("back", "leaf", Text(text="fail"), Text)
    ok, failed = exporter.get_finished_spans()
    assert [e.name for e in ok.events] == [] and [e.name for e in failed.events] == []
    assert ok.attributes is not None and ok.attributes["mesh.fate"] == "ok"
    assert failed.attributes is not None and failed.attributes["mesh.fate"] == "failed"


def test_console_spans_are_one_json_line_each() -> None:
    """The console exporter writes each span as one JSON object on one line."""
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("a/b", attributes={"mesh.rule": "r"})
    span.end()
    line = _one_line(span)  # type: ignore[arg-type]
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line)["name"] == "a/b"
