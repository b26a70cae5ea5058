"""Traces, metrics, the Prometheus endpoint and the access log, on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import nats
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

import mesh
from mesh._core.crypto import PairKeys, seal_body
from mesh._core.envelope import HDR_DEADLINE, HDR_TRACEPARENT, MAGIC, PREFIX, Kind
from mesh._observability.metrics import serve_prometheus
from mesh.control_plane import PolicyEngine, SignalRow, SignalsReply, SignalsRequest, TrustRoot
from mesh.testing import NatsServer, Trust, test_config, wait_until

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus)"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Text(BaseModel):
    text: str


def three_hops(flaky: Counter[str]) -> tuple[mesh.Agent, mesh.Agent]:
    front, back = mesh.Agent("front"), mesh.Agent("back")

    @back.endpoint(idempotent=True)
    async def leaf(t: Text) -> Text:
        flaky["leaf"] += 1
        if t.text == "retry" and flaky["leaf"] == 1:
            raise mesh.Unavailable("first attempt fails")
        if t.text == "fail":
            raise mesh.NotFound("no such thing")
        return Text(text=t.text.upper())

    @front.endpoint(idempotent=True)
    async def relay(t: Text, ctx: mesh.Context) -> Text:
        return await ctx.request("back", "leaf", t, Text)

    return front, back


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind and s.name == name]


async def test_three_hop_call_is_one_trace_with_ordered_spans(
    nats_server: NatsServer, trust: Trust, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """alice -> front -> back yields one trace: client, server, client, server, each the
    parent of the next, with RPC attributes; a retry shows as an event."""
    provider, exporter = spans
    cfg = test_config([nats_server.url])
    flaky: Counter[str] = Counter()
    front, back = three_hops(flaky)
    async with (
        mesh.Mesh(trust.identity("back"), cfg, agent=back, tracer_provider=provider),
        mesh.Mesh(trust.identity("front"), cfg, agent=front, tracer_provider=provider) as f,
        mesh.Mesh(trust.identity("alice"), cfg, tracer_provider=provider) as alice,
    ):
        await alice.wait_for("front")
        await f.wait_for("back")
        assert (await alice.request("front", "relay", Text(text="retry"), Text)).text == "RETRY"
    done = exporter.get_finished_spans()
    (root,) = by_kind(done, SpanKind.CLIENT, "front/relay")
    (front_server,) = by_kind(done, SpanKind.SERVER, "front/relay")
    (front_client,) = by_kind(done, SpanKind.CLIENT, "back/leaf")
    back_servers = by_kind(done, SpanKind.SERVER, "back/leaf")
    assert len(back_servers) == 2  # the failed attempt and the retry
    assert {s.context.trace_id for s in done} == {root.context.trace_id}
    assert root.parent is None
    assert front_server.parent is not None
    assert front_server.parent.span_id == root.context.span_id
    assert front_client.parent is not None
    assert front_client.parent.span_id == front_server.context.span_id
    for s in back_servers:
        assert s.parent is not None and s.parent.span_id == front_client.context.span_id
    assert root.attributes is not None
    assert root.attributes["rpc.system"] == "natsmesh"
    assert root.attributes["rpc.service"] == "front"
    assert root.attributes["rpc.method"] == "relay"
    assert str(root.attributes["messaging.destination.name"]).startswith("mesh.rpc.front.")
    retries = [e for e in front_client.events if e.name == "retry"]
    assert len(retries) == 1 and retries[0].attributes is not None
    assert retries[0].attributes["error.type"] == "UNAVAILABLE"
    assert retries[0].attributes["mesh.fate"] == "retried"
    failed = [s for s in back_servers if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1


async def test_failed_call_marks_span_with_error_code(
    nats_server: NatsServer, trust: Trust, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A call that fails ends its spans with ERROR status and the mesh error code."""
    provider, exporter = spans
    cfg = test_config([nats_server.url])
    _front, back = three_hops(Counter())
    async with (
        mesh.Mesh(trust.identity("back"), cfg, agent=back, tracer_provider=provider),
        mesh.Mesh(trust.identity("alice"), cfg, tracer_provider=provider) as alice,
    ):
        await alice.wait_for("back")
        with pytest.raises(mesh.NotFound):
            await alice.request("back", "leaf", Text(text="fail"), Text)
    for s in exporter.get_finished_spans():
        assert s.status.status_code == StatusCode.ERROR
        assert s.attributes is not None and s.attributes["error.type"] == "NOT_FOUND"


async def test_plain_nats_client_traceparent_is_continued(
    nats_server: NatsServer, trust: Trust, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A request built by a plain nats-py client with a W3C traceparent header (and the
    same value sealed, as the protocol requires) gets a server span in that trace."""
    provider, exporter = spans
    cfg = test_config([nats_server.url])
    _front, back = three_hops(Counter())
    caller = trust.identity("scripted")
    async with mesh.Mesh(trust.identity("back"), cfg, agent=back, tracer_provider=provider) as b:
        nc = await nats.connect(nats_server.url)
        try:
            traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
            deadline = int((time.time() + 5) * 1000)
            header = {
                "k": int(Kind.REQUEST),
                "id": os.urandom(16),
                "ts": int(time.time() * 1000),
                "fa": "scripted",
                "fi": caller.instance,
                "ta": "back",
                "ti": b.instance,
                "ep": "leaf",
                "dl": deadline,
                "at": 1,
                "ct": caller.certificate.raw,
                "tp": traceparent,
            }
            hb = msgpack.packb(header, use_bin_type=True)
            aad = PREFIX.pack(MAGIC, len(hb)) + hb
            key = PairKeys(caller.keys.box).get(b.identity.certificate.box_pk)
            frame = aad + seal_body(key, aad, b'{"text": "hi"}')
            reply = await nc.request(
                f"mesh.rpc.back.{b.instance}.leaf",
                frame,
                timeout=5,
                headers={HDR_TRACEPARENT: traceparent, HDR_DEADLINE: str(deadline)},
            )
            assert reply.data
        finally:
            await nc.close()
    (server,) = exporter.get_finished_spans()
    assert server.kind == SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, object], float]]:
    data = reader.get_metrics_data()
    assert data is not None
    out = []
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        out.append((dict(p.attributes or {}), p.value))  # type: ignore[union-attr]
    return out


POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: metrics}
spec:
  rules:
    - name: alice-ok
      allow: {callers: [alice], agent: back}
  endpoints:
    back.leaf:
      rate_limit: {per_caller: 2/s, burst: 3}
"""


async def test_metrics_count_successes_denials_and_rate_limits(
    nats_server: NatsServer, trust: Trust
) -> None:
    """After a known mix of calls the metrics show counts by edge, code and reporter, the
    authorization decisions by rule, rate-limited requests and the certificate expiry."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    _front, back = three_hops(Counter())
    engine = PolicyEngine(mesh.parse_policy(POLICY), revision=1)
    async with (
        mesh.Mesh(trust.identity("back"), cfg, agent=back, meter_provider=meters) as b,
        mesh.Mesh(trust.identity("alice"), cfg, meter_provider=meters) as alice,
        mesh.Mesh(trust.identity("mallory"), cfg) as mallory,
    ):
        b.governance.engine = engine  # as if the registry had applied POLICY
        await alice.wait_for("back")
        for _ in range(3):
            await alice.request("back", "leaf", Text(text="a"), Text)
        for _ in range(2):
            with pytest.raises(mesh.ResourceExhausted):
                await alice.request("back", "leaf", Text(text="a"), Text)
        for _ in range(2):
            with pytest.raises(mesh.PermissionDenied):
                await mallory.request("back", "leaf", Text(text="m"), Text)
        requests = points(reader, "mesh.requests")
        decisions = points(reader, "mesh.authz.decisions")
        limited = points(reader, "mesh.rate_limited")
        expiry = points(reader, "mesh.certificate.expiry")
    server_ok = [
        v for a, v in requests if a["mesh.reporter"] == "server" and a["mesh.code"] == "OK"
    ]
    client = {
        a["mesh.code"]: v
        for a, v in requests
        if a["mesh.reporter"] == "client" and a["mesh.source"] == "alice"
    }
    assert server_ok == [3]
    assert client == {"OK": 3, "RESOURCE_EXHAUSTED": 2}
    assert {(a["mesh.result"], a["mesh.rule"]): v for a, v in decisions if "mesh.rule" in a} == {
        ("allow", "alice-ok"): 3,
        ("deny", "default deny"): 2,
    }
    assert [v for a, v in limited if a["mesh.agent"] == "back"] == [2]
    assert any(v == b.identity.certificate.not_after for _a, v in expiry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_prometheus_endpoint_and_access_log_from_the_runner(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`mesh-agent run --metrics-port --access-log` serves metrics over HTTP and writes one
    JSON access line per request, with no payload in it."""
    root = TrustRoot.generate()
    mesh.save_identity(root.issue_identity("worker"), tmp_path / "worker")
    port = free_port()
    env = {
        **os.environ,
        "MESH_SERVERS": nats_server.url,
        "MESH_IDENTITY": str(tmp_path / "worker"),
        "MESH_ALLOW_NO_POLICY": "1",  # no registry in this mesh
    }
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "mesh-agent"),
        "run",
        "tests.integration.workers:worker",
        "--metrics-port",
        str(port),
        "--metrics-addr",
        "127.0.0.1",
        "--access-log",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        from .workers import Done, Job

        async with mesh.Mesh(root.issue_identity("alice"), test_config([nats_server.url])) as a:
            await a.wait_for("worker", timeout=20)
            for i in range(3):
                await a.request("worker", "work", Job(key=f"secret-{i}"), Done)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        text = await asyncio.to_thread(scrape)
        lines = [ln for ln in text.splitlines() if ln.startswith("mesh_requests_total{")]
        ok = [ln for ln in lines if 'mesh_reporter="server"' in ln and 'mesh_code="OK"' in ln]
        assert ok and ok[0].endswith(" 3.0"), lines
        assert "mesh_certificate_expiry" in text
        [target] = [f for f in text_string_to_metric_families(text) if f.name == "target_info"]
        labels = target.samples[0].labels
        assert labels["service_name"] == "worker"  # not unknown_service
        assert labels["service_instance_id"] == mesh.load_identity(tmp_path / "worker").instance
        if PROMTOOL is not None:
            assert await promtool_check(text) == ""
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.stdout is not None
    out = (await proc.stdout.read()).decode().splitlines()
    access = [json.loads(ln) for ln in out if ln.startswith("{")]
    assert len(access) == 3
    assert {a["caller"] for a in access} == {"alice"} and access[0]["endpoint"] == "work"
    assert access[0]["code"] == "OK" and access[0]["request_bytes"] > 0
    assert "secret" not in "\n".join(out)


async def test_golden_signals_reach_the_registry(nats_server: NatsServer) -> None:
    """Agents report per-edge signals; the registry's table gives rps, success and latency."""
    from mesh_agents import registry as reg

    root = TrustRoot.generate()
    cfg = test_config([nats_server.url], signals_interval=0.2)
    _front, back = three_hops(Counter())
    async with (
        mesh.Mesh(
            root.issue_identity("registry", roles=["registry"]),
            cfg,
            agent=reg.registry,
            trust_root=root,
        ),
        mesh.Mesh(root.issue_identity("back"), cfg, agent=back),
        mesh.Mesh(root.issue_identity("admin", roles=["admin"]), cfg) as admin,
    ):
        await admin.wait_for("back")
        for _ in range(5):
            await admin.request("back", "leaf", Text(text="x"), Text)
        with pytest.raises(mesh.NotFound):
            await admin.request("back", "leaf", Text(text="fail"), Text)

        async def table() -> SignalsReply:
            return await admin.request("registry", "signals", SignalsRequest(), SignalsReply)

        end = asyncio.get_running_loop().time() + 5
        reply = await table()
        while not reply.edges and asyncio.get_running_loop().time() < end:
            await asyncio.sleep(0.1)
            reply = await table()
    row = next(r for r in reply.rows if r.callee == "back" and r.caller == "*")
    assert row.requests == 6 and row.errors == 1
    assert row.success_rate is not None and abs(row.success_rate - 5 / 6) < 1e-6
    assert row.p50_ms is not None and row.p99_ms is not None
    assert ("admin", "back") in [(e.caller, e.callee) for e in reply.edges]
    assert "back" in reply.nodes


async def promtool_check(text: str) -> str:
    """``promtool check metrics`` of an exposition: its complaints ("" when it has none)."""
    assert PROMTOOL is not None
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def scrape_after_requests(
    nats_server: NatsServer, trust: Trust, ok: int, failed: int
) -> tuple[str, str]:
    """Serve the process's metrics on a free port, make ``ok`` good and ``failed`` failing
    calls from alice to back, and return the scraped text and back's instance."""
    server = serve_prometheus(0, "127.0.0.1", service_name="back")
    try:
        cfg = test_config([nats_server.url])
        _front, back = three_hops(Counter())
        async with (
            mesh.Mesh(trust.identity("back"), cfg, agent=back) as b,
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await alice.wait_for("back")
            for _ in range(ok):
                await alice.request("back", "leaf", Text(text="a"), Text)
            for _ in range(failed):
                with pytest.raises(mesh.NotFound):
                    await alice.request("back", "leaf", Text(text="fail"), Text)

            def scrape() -> str:
                url = f"http://127.0.0.1:{server.server_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    return str(r.read().decode())

            return await asyncio.to_thread(scrape), b.instance
    finally:
        server.shutdown()
        server.server_close()


async def test_prometheus_latency_is_a_histogram_counting_every_request(
    nats_server: NatsServer, trust: Trust
) -> None:
    """The live endpoint parses as Prometheus text; latency is one histogram per edge whose
    buckets only grow and whose _count is the number of requests served, every code."""
    text, instance = await scrape_after_requests(nats_server, trust, ok=6, failed=1)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    hist = families["mesh_request_duration_seconds"]

    def served(labels: dict[str, str]) -> bool:
        return labels["mesh_instance"] == instance and labels["mesh_reporter"] == "server"

    buckets = [
        (float(s.labels["le"]), s.value)
        for s in hist.samples
        if s.name == "mesh_request_duration_seconds_bucket" and served(s.labels)
    ]
    [count] = [
        s.value
        for s in hist.samples
        if s.name == "mesh_request_duration_seconds_count" and served(s.labels)
    ]
    [total] = [
        s.value
        for s in hist.samples
        if s.name == "mesh_request_duration_seconds_sum" and served(s.labels)
    ]
    requests = {
        s.labels["mesh_code"]: s.value
        for s in families["mesh_requests"].samples
        if s.name == "mesh_requests_total" and served(s.labels)
    }
    assert hist.type == "histogram"
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
    assert buckets[-1] == (math.inf, 7)
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)
    assert count == 7 and total > 0
    assert requests == {"OK": 6, "NOT_FOUND": 1}
    assert "mesh_request_duration_bucket_total" not in text  # the old counters are gone


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
async def test_prometheus_endpoint_passes_promtool(nats_server: NatsServer, trust: Trust) -> None:
    """`promtool check metrics` finds nothing to say about the live endpoint."""
    text, _instance = await scrape_after_requests(nats_server, trust, ok=3, failed=1)

    assert await promtool_check(text) == ""


async def test_a_short_lived_callers_last_report_reaches_the_registry(
    nats_server: NatsServer,
) -> None:
    """A caller that closes before its first reporting interval still reports: drain sends a
    final report, and closing stays quick."""
    from mesh_agents import registry as reg

    root = TrustRoot.generate()
    fast = test_config([nats_server.url], signals_interval=0.2)
    never = test_config([nats_server.url], signals_interval=3600.0)  # only the final report
    _front, back = three_hops(Counter())
    async with (
        mesh.Mesh(
            root.issue_identity("registry", roles=["registry"]),
            fast,
            agent=reg.registry,
            trust_root=root,
        ),
        mesh.Mesh(root.issue_identity("back"), never, agent=back),
        mesh.Mesh(root.issue_identity("admin", roles=["admin"]), fast) as admin,
    ):
        caller = mesh.Mesh(root.issue_identity("shortlived"), never)
        await caller.start()
        await caller.wait_for("back")
        for _ in range(4):
            await caller.request("back", "leaf", Text(text="x"), Text)
        started = time.monotonic()
        await caller.drain()
        closing = time.monotonic() - started

        async def rows() -> list[SignalRow]:
            ask = SignalsRequest(reporter="client")
            return (await admin.request("registry", "signals", ask, SignalsReply)).rows

        end = time.monotonic() + 5
        found = [r for r in await rows() if r.caller == "shortlived"]
        while not found and time.monotonic() < end:
            await asyncio.sleep(0.1)
            found = [r for r in await rows() if r.caller == "shortlived"]
    assert [(r.callee, r.endpoint, r.requests, r.errors) for r in found] == [("back", "leaf", 4, 0)]
    assert closing < 3.0


async def test_cancelled_calls_and_streams_show_in_spans_and_metrics(
    nats_server: NatsServer, trust: Trust, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A request whose caller cancelled it ends both spans CANCELLED and counts as CANCELLED
    on both sides; a stream's CLIENT span lasts until its consumer is done: OK when read to
    the end, CANCELLED when left early."""
    provider, exporter = spans
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    cfg = test_config([nats_server.url])
    agent = mesh.Agent("slow")
    started = asyncio.Event()

    @agent.endpoint()
    async def wait(t: Text) -> Text:
        started.set()
        await asyncio.sleep(30)
        return t

    @agent.endpoint()
    async def spell(t: Text) -> AsyncIterator[Text]:
        for letter in t.text:
            yield Text(text=letter)

    async with (
        mesh.Mesh(
            trust.identity("slow"), cfg, agent=agent, tracer_provider=provider,
            meter_provider=meters,
        ),
        mesh.Mesh(
            trust.identity("alice"), cfg, tracer_provider=provider, meter_provider=meters
        ) as alice,
    ):  # fmt: skip
        await alice.wait_for("slow")
        call = asyncio.create_task(alice.request("slow", "wait", Text(text="x"), Text))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert [t.text async for t in alice.stream("slow", "spell", Text(text="abc"), Text)] == [
            "a",
            "b",
            "c",
        ]
        async for _ in alice.stream("slow", "spell", Text(text="abcdef"), Text, credit=1):
            break
        await wait_until(
            lambda: len(by_kind(exporter.get_finished_spans(), SpanKind.SERVER, "slow/spell")) == 2
        )
        await wait_until(
            lambda: by_kind(exporter.get_finished_spans(), SpanKind.SERVER, "slow/wait") != []
        )
        requests = points(reader, "mesh.requests")
    done = exporter.get_finished_spans()
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        (span,) = by_kind(done, kind, "slow/wait")
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes is not None and span.attributes["error.type"] == "CANCELLED"
    streams = sorted(
        (s.attributes or {}).get("rpc.natsmesh.status_code", "")
        for s in by_kind(done, SpanKind.CLIENT, "slow/spell")
    )
    assert streams == ["CANCELLED", "OK"]
    codes = {
        (a["mesh.reporter"], a["mesh.endpoint"], a["mesh.code"]): v
        for a, v in requests
        if a["mesh.destination"] == "slow"
    }
    assert codes[("server", "wait", "CANCELLED")] == 1
    assert codes[("client", "wait", "CANCELLED")] == 1
    assert codes[("client", "spell", "OK")] == 1
    assert codes[("client", "spell", "CANCELLED")] == 1
