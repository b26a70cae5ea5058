"""Telemetry: OpenTelemetry spans, OpenTelemetry metrics and the access log of one ``Mesh``.

Tracing uses the OpenTelemetry SDK when the application (or ``mesh-agent run --traces``)
installed a tracer provider; otherwise no span is made at all. Spans follow the OpenTelemetry
RPC and messaging conventions; W3C trace context travels in the sealed header and as readable
NATS headers. Sampling follows the parent (the SDK's default ``ParentBased`` sampler).

Metrics are aggregated by the mesh itself on the hot path (``mesh.signals.EdgeStats``, about a
microsecond per request) and handed to OpenTelemetry by observable instruments at collection
time. The SDK's synchronous instruments were measured at 15 to 20 µs per recording here, more
than sealing and opening a message, so the hot path does not call them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet

import structlog
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from mesh._runtime.mesh import Mesh

__all__ = ["Telemetry", "install_tracing", "serve_prometheus"]

OK = "OK"
RPC_SYSTEM = "natsmesh"
_PROPAGATOR = TraceContextTextMapPropagator()
_SCOPE = "natsmesh"


def _tracing_installed(provider: trace.TracerProvider) -> bool:
    return not isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider)


def _access_logger() -> Any:
    # JSON lines on stdout whatever the application's structlog setup: an access log is data.
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stdout),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.JSONRenderer(),
        ],
    )


class Telemetry:
    """Spans, metrics and access log for one mesh connection; every hook is cheap when off.

    Args:
        mesh: the connection it reports for.
        tracer_provider: where spans go (default: the global provider; none when unset).
        meter_provider: where metrics go (default: the global provider).
        access_log: write one JSON line per served request.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        access_log: bool = False,
    ) -> None:
        self._mesh = mesh
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracing = _tracing_installed(provider)
        self.tracer = provider.get_tracer(_SCOPE)
        self.access_log = access_log
        self._access = _access_logger() if access_log else None
        self._meter_provider = meter_provider

    # --- tracing -----------------------------------------------------------------------------

    def _parent(self, traceparent: str | None, tracestate: str | None) -> otel_context.Context:
        if traceparent is None:
            return otel_context.get_current()
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        return _PROPAGATOR.extract(carrier)

    @staticmethod
    def _inject(span: Span) -> tuple[str | None, str | None]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent"), carrier.get("tracestate")

    def start_client(
        self, agent: str, endpoint: str, traceparent: str | None, tracestate: str | None
    ) -> tuple[Span | None, str | None, str | None]:
        """A CLIENT span for a call; returns it and the trace context to send."""
        if not self.tracing:
            return None, traceparent, tracestate
        span = self.tracer.start_span(
            f"{agent}/{endpoint}",
            context=self._parent(traceparent, tracestate),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": RPC_SYSTEM,
                "rpc.service": agent,
                "rpc.method": endpoint,
                "messaging.system": "nats",
                "mesh.caller": self._mesh.name,
            },
        )
        tp, ts = self._inject(span)
        return span, tp or traceparent, ts if ts is not None else tracestate

    @staticmethod
    def attempt(span: Span | None, attempt: int, subject: str, message_id: bytes) -> None:
        """Note the destination of an attempt on the client span."""
        if span is not None:
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("messaging.message.id", message_id.hex())
            span.set_attribute("mesh.attempts", attempt)

    @staticmethod
    def retry(span: Span | None, attempt: int, code: str, fate: str, delay: float) -> None:
        """Record a retry (or the decision not to) as a span event."""
        if span is not None:
            span.add_event(
                "retry",
                {
                    "mesh.attempt": attempt,
                    "error.type": code,
                    "mesh.fate": fate,
                    "mesh.backoff_ms": round(delay * 1000, 3),
                },
            )

    @staticmethod
    def end(span: Span | None, code: str, fate: str | None = None) -> None:
        """Finish a span with the mesh status code."""
        if span is None:
            return
        span.set_attribute("rpc.natsmesh.status_code", code)
        if fate is not None:
            span.set_attribute("mesh.fate", fate)
        if code != OK:
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()

    def start_server(
        self,
        agent: str,
        endpoint: str,
        subject: str,
        message_id: bytes,
        caller: str,
        traceparent: str | None,
        tracestate: str | None,
    ) -> tuple[Span | None, str | None, str | None]:
        """A SERVER span continuing the caller's trace; returns the context for nested calls."""
        if not self.tracing:
            return None, traceparent, tracestate
        span = self.tracer.start_span(
            f"{agent}/{endpoint}",
            context=self._parent(traceparent, tracestate) if traceparent else None,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": RPC_SYSTEM,
                "rpc.service": agent,
                "rpc.method": endpoint,
                "messaging.system": "nats",
                "messaging.destination.name": subject,
                "messaging.message.id": message_id.hex(),
                "mesh.caller": caller,
                "mesh.instance": self._mesh.instance,
            },
        )
        tp, ts = self._inject(span)
        return span, tp or traceparent, ts if ts is not None else tracestate

    # --- access log --------------------------------------------------------------------------

    def log_access(
        self,
        *,
        caller: str,
        caller_instance: str,
        endpoint: str,
        code: str,
        seconds: float,
        request_bytes: int,
        reply_bytes: int,
        traceparent: str | None,
        attempt: int,
    ) -> None:
        """One JSON line for a served request; never the payload."""
        if self._access is None:
            self._access = _access_logger()
        self._access.info(
            "access",
            caller=caller,
            caller_instance=caller_instance,
            callee=self._mesh.name,
            callee_instance=self._mesh.instance,
            endpoint=endpoint,
            code=code,
            duration_ms=round(seconds * 1000, 3),
            request_bytes=request_bytes,
            reply_bytes=reply_bytes,
            trace_id=traceparent.split("-")[1] if traceparent and "-" in traceparent else None,
            attempt=attempt,
        )

    # --- metrics -----------------------------------------------------------------------------

    def register_metrics(self) -> None:
        """Report this mesh's aggregates through the meter provider's instruments."""
        provider = self._meter_provider or otel_metrics.get_meter_provider()
        hub = _HUBS.get(provider)
        if hub is None:
            hub = _HUBS[provider] = _MetricsHub(provider)
        hub.meshes.add(self._mesh)


class _MetricsHub:
    """One set of observable instruments per meter provider, reading every mesh of the
    process that reports to it (OpenTelemetry keeps only the first instrument of a name)."""

    def __init__(self, provider: otel_metrics.MeterProvider) -> None:
        self.meshes: WeakSet[Mesh] = WeakSet()
        meter = provider.get_meter(_SCOPE)
        each = self._each
        counter, gauge = meter.create_observable_counter, meter.create_observable_gauge
        self.instruments = [
            counter(
                "mesh.requests",
                [each(_requests)],
                unit="{request}",
                description="requests by source, destination, endpoint, code and reporter",
            ),
            counter(
                "mesh.request.duration.sum",
                [each(_duration_sum)],
                unit="s",
                description="total request time by edge and code",
            ),
            counter(
                "mesh.request.duration.bucket",
                [each(_duration_buckets)],
                unit="{request}",
                description="requests at or under the 'le' bound in seconds (a histogram)",
            ),
            meter.create_observable_up_down_counter(
                "mesh.requests.inflight",
                [each(_inflight)],
                unit="{request}",
                description="requests in flight by edge and reporter",
            ),
            counter(
                "mesh.calls.fate",
                [each(_fates)],
                unit="{call}",
                description="client calls by fate (ok, ok_after_retry, retries_exhausted...)",
            ),
            counter(
                "mesh.authz.decisions",
                [each(_decisions)],
                unit="{decision}",
                description="authorization decisions by result and rule",
            ),
            counter(
                "mesh.refused",
                [each(_refused)],
                unit="{message}",
                description="requests refused before a handler, by code",
            ),
            counter(
                "mesh.rate_limited",
                [each(_rate_limited)],
                unit="{request}",
                description="requests refused by a rate limit",
            ),
            gauge(
                "mesh.certificate.expiry",
                [each(_cert_expiry)],
                unit="s",
                description="unix time at which the instance's certificate expires",
            ),
            gauge(
                "mesh.certificate.remaining",
                [each(_cert_left)],
                unit="s",
                description="seconds until the instance's certificate expires",
            ),
            gauge(
                "mesh.trust_root.expiry",
                [each(_root_expiry)],
                unit="s",
                description="unix time by which the trust root should be rotated (where known)",
            ),
        ]

    def _each(
        self, read: Callable[[Mesh, dict[str, str]], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for m in list(self.meshes):
                yield from read(m, {"mesh.agent": m.name, "mesh.instance": m.instance})

        return callback


def _requests(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for key, code, count, _sum in m.signals.totals():
        yield Observation(count, {**base, **_edge_attrs(key), "mesh.code": code})


def _duration_sum(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for key, code, _count, total in m.signals.totals():
        yield Observation(total, {**base, **_edge_attrs(key), "mesh.code": code})


def _duration_buckets(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for key, le, count in m.signals.cumulative_buckets():
        yield Observation(count, {**base, **_edge_attrs(key), "le": le})


def _inflight(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for key, n in m.signals.inflight_by_edge():
        yield Observation(n, {**base, **_edge_attrs(key)})


def _fates(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for fate, n in sorted(m.stats.fates.items()):
        yield Observation(n, {**base, "mesh.fate": fate})


def _decisions(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for (result, rule), n in sorted(m.governance.decisions.items()):
        yield Observation(n, {**base, "mesh.result": result, "mesh.rule": rule})


def _refused(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    for code, n in sorted(m.stats.refused.items()):
        yield Observation(n, {**base, "mesh.code": code})


def _rate_limited(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    yield Observation(m.stats.refused.get("RESOURCE_EXHAUSTED", 0), base)


def _cert_expiry(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    cert = m.identity.certificate
    yield Observation(cert.not_after, {**base, "mesh.serial": cert.serial})


def _cert_left(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    cert = m.identity.certificate
    yield Observation(cert.not_after - time.time(), {**base, "mesh.serial": cert.serial})


def _root_expiry(m: Mesh, base: dict[str, str]) -> Iterable[Observation]:
    if m.trust_root.not_after is not None:
        yield Observation(m.trust_root.not_after, {**base, "mesh.root": m.trust_root.key_id})


_HUBS: WeakKeyDictionary[otel_metrics.MeterProvider, _MetricsHub] = WeakKeyDictionary()


def install_tracing(exporter: str, service_name: str) -> trace.TracerProvider | None:
    """Install a global tracer provider exporting spans to ``exporter``.

    Args:
        exporter: ``none``, ``console`` (JSON spans on stderr) or ``otlp`` (OTLP over HTTP,
            configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables; needs the
            ``natsmesh[otlp]`` extra).
        service_name: the ``service.name`` resource attribute.

    Raises:
        InvalidArgument: unknown exporter.
        FailedPrecondition: the OTLP exporter is not installed.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    from mesh.errors import FailedPrecondition, InvalidArgument

    if exporter == "none":
        return None
    provider = SdkTracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise FailedPrecondition(
                "--traces otlp needs the OTLP exporter: pip install 'natsmesh[otlp]'"
            ) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise InvalidArgument(f"unknown trace exporter {exporter!r}: use none, console or otlp")
    trace.set_tracer_provider(provider)
    return provider


def serve_prometheus(port: int, addr: str = "0.0.0.0") -> otel_metrics.MeterProvider:  # noqa: S104
    """Serve the mesh's metrics for Prometheus at ``http://addr:port/metrics`` (through the
    OpenTelemetry Prometheus exporter) and install the global meter provider."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
    provider = SdkMeterProvider(metric_readers=[PrometheusMetricReader()])
    otel_metrics.set_meter_provider(provider)
    return provider


def _edge_attrs(key: tuple[str, str, str, str]) -> dict[str, str]:
    caller, callee, endpoint, reporter = key
    return {
        "mesh.source": caller,
        "mesh.destination": callee,
        "mesh.endpoint": endpoint,
        "mesh.reporter": reporter,
    }
