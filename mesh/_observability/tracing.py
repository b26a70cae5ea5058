"""Tracing: OpenTelemetry spans for calls and served requests, across hops.

Spans are made only when the application (or ``mesh-agent run --traces``) installed a tracer
provider; otherwise no span is made at all. They follow the OpenTelemetry RPC and messaging
conventions; W3C trace context travels in the sealed header and as readable NATS headers.
Sampling follows the parent (the SDK's default ``ParentBased`` sampler).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["Tracing", "install_tracing"]

OK = "OK"
RPC_SYSTEM = "natsmesh"
SCOPE = "natsmesh"
_PROPAGATOR = TraceContextTextMapPropagator()


def _tracing_installed(provider: trace.TracerProvider) -> bool:
    return not isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider)


class Tracing:
    """The spans of one mesh connection.

    Args:
        agent / instance: who this connection is (span attributes).
        tracer_provider: where spans go (default: the global provider; none when unset).
    """

    def __init__(
        self, agent: str, instance: str, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        self._agent = agent
        self._instance = instance
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracing = _tracing_installed(provider)
        self.tracer = provider.get_tracer(SCOPE)

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
                "mesh.caller": self._agent,
            },
        )
        tp, ts = self._inject(span)
        return span, tp or traceparent, ts if ts is not None else tracestate

    def attempt(self, span: Span | None, attempt: int, subject: str, message_id: bytes) -> None:
        """Note the destination of an attempt on the client span."""
        if span is not None:
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("messaging.message.id", message_id.hex())
            span.set_attribute("mesh.attempts", attempt)

    def retry(self, span: Span | None, attempt: int, code: str, fate: str, delay: float) -> None:
        """Record a retry as a span event; a call that is over (``fate`` other than
        ``retried``) gets no event: its fate is the span's ``mesh.fate`` attribute."""
        if span is not None and fate == "retried":
            span.add_event(
                "retry",
                {
                    "mesh.attempt": attempt,
                    "error.type": code,
                    "mesh.fate": fate,
                    "mesh.backoff_ms": round(delay * 1000, 3),
                },
            )

    def traffic(
        self,
        span: Span | None,
        event: str,
        attrs: Mapping[str, str],
        access: Mapping[str, Any] | None = None,
    ) -> None:
        """A traffic-management event as a span event (``mesh.fault`` also as an attribute,
        so injected faults are easy to find)."""
        if span is None:
            return
        span.add_event(event, {f"mesh.{k}": v for k, v in attrs.items()})
        fault = attrs.get("fault")
        if fault is not None:
            span.set_attribute("mesh.fault", fault)

    def end(
        self, span: Span | None, code: str, fate: str | None = None, rule: str | None = None
    ) -> None:
        """Finish a span with the mesh status code, the call's fate and a denial's rule."""
        if span is None:
            return
        span.set_attribute("rpc.natsmesh.status_code", code)
        if fate is not None:
            span.set_attribute("mesh.fate", fate)
        if rule is not None:
            span.set_attribute("mesh.rule", rule)
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
                "mesh.instance": self._instance,
            },
        )
        tp, ts = self._inject(span)
        return span, tp or traceparent, ts if ts is not None else tracestate


def _one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def install_tracing(
    exporter: str, service_name: str, instance: str | None = None
) -> trace.TracerProvider | None:
    """Install a global tracer provider exporting spans to ``exporter``.

    Args:
        exporter: ``none``, ``console`` (one JSON object per span and line, on stderr) or
            ``otlp`` (OTLP over HTTP, configured by the standard ``OTEL_EXPORTER_OTLP_*``
            variables; needs the ``natsmesh[otlp]`` extra).
        service_name: the default ``service.name`` (``OTEL_SERVICE_NAME`` overrides it).
        instance: the default ``service.instance.id``.

    Raises:
        InvalidArgument: unknown exporter.
        FailedPrecondition: the OTLP exporter is not installed.
    """
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    from mesh._observability.resource import service_resource
    from mesh.errors import FailedPrecondition, InvalidArgument

    if exporter == "none":
        return None
    provider = SdkTracerProvider(resource=service_resource(service_name, instance))
    if exporter == "console":
        # One JSON object per line: stderr also carries the log (JSON lines with
        # --log-format json), and the SDK's default dump spans many lines.
        exporter_ = ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
        provider.add_span_processor(SimpleSpanProcessor(exporter_))
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
