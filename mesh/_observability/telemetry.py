"""Telemetry: the ``Observer`` of the runtime, made of tracing, metrics and the access log.

``mesh.Mesh`` builds one per connection; the runtime calls it through the ``Observer`` port
and never imports OpenTelemetry itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace

from mesh._observability.access_log import AccessLog
from mesh._observability.metrics import register_metrics
from mesh._observability.tracing import Tracing
from mesh._runtime.ports import StatsSource

__all__ = ["Telemetry"]


class Telemetry(Tracing):
    """Spans, metrics and access log for one mesh connection; every hook is cheap when off.

    Args:
        agent / instance: who this connection is.
        tracer_provider: where spans go (default: the global provider; none when unset).
        meter_provider: where metrics go (default: the global provider).
        access_log: write one JSON line per served request.
    """

    def __init__(
        self,
        agent: str,
        instance: str,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        access_log: bool = False,
    ) -> None:
        super().__init__(agent, instance, tracer_provider)
        self.access_log = access_log
        self._access = AccessLog(agent, instance)
        self._meter_provider = meter_provider

    def log_access(self, **fields: Any) -> None:
        """One JSON line for a served request; never the payload."""
        self._access.write(**fields)

    def traffic(
        self,
        span: Any,
        event: str,
        attrs: Mapping[str, str],
        access: Mapping[str, Any] | None = None,
    ) -> None:
        """A span event and, for an injected fault, a caller-side access-log line."""
        super().traffic(span, event, attrs, access)
        if access is not None:
            self._access.write_client(**access)

    def register_metrics(self, source: StatsSource) -> None:
        """Report ``source``'s aggregates through the meter provider's instruments."""
        register_metrics(source, self._meter_provider)
