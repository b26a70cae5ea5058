"""Metrics: the mesh's own aggregates, read at collection time by OpenTelemetry and Prometheus.

Metrics are aggregated by the mesh itself on the hot path (``EdgeStats``, about a microsecond
per request) and read only when someone collects: by OpenTelemetry observable instruments
(``register_metrics``) and by a Prometheus collector (``serve_prometheus``). The SDK's
synchronous instruments were measured at 15 to 20 µs per recording here, more than sealing
and opening a message, so the hot path does not call them.

Prometheus gets its own collector, not the OpenTelemetry Prometheus exporter: OpenTelemetry
has no observable histogram, so from observable instruments the exporter can only write the
latency buckets as counters with an ``le`` label, which is not a Prometheus histogram
(``promtool check metrics`` refuses it). The collector yields a real histogram family
(``mesh_request_duration_seconds_bucket`` / ``_sum`` / ``_count``) from the same buckets.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary, WeakSet

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

from mesh._runtime.ports import StatsSource

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

__all__ = ["MeshCollector", "register_metrics", "serve_prometheus"]

SCOPE = "natsmesh"


def register_metrics(source: StatsSource, provider: otel_metrics.MeterProvider | None) -> None:
    """Report ``source``'s aggregates through the meter provider's instruments (default: the
    global provider), and on the process's Prometheus endpoint if it serves one."""
    provider = provider or otel_metrics.get_meter_provider()
    hub = _HUBS.get(provider)
    if hub is None:
        hub = _HUBS[provider] = _MetricsHub(provider)
    hub.meshes.add(source)
    with _SOURCES_LOCK:
        # Keyed by instance: a connection made again with the same identity replaces the old
        # one, so Prometheus never sees one series twice.
        _SOURCES[(source.name, source.instance)] = weakref.ref(source)


def _sources() -> list[StatsSource]:
    """Every live mesh connection of the process that registered its metrics."""
    with _SOURCES_LOCK:
        live = [(key, ref()) for key, ref in _SOURCES.items()]
        for key, source in live:
            if source is None:
                del _SOURCES[key]
    return [source for _, source in sorted(live, key=lambda kv: kv[0]) if source is not None]


class _MetricsHub:
    """One set of observable instruments per meter provider, reading every mesh of the
    process that reports to it (OpenTelemetry keeps only the first instrument of a name)."""

    def __init__(self, provider: otel_metrics.MeterProvider) -> None:
        self.meshes: WeakSet[StatsSource] = WeakSet()
        meter = provider.get_meter(SCOPE)
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
            gauge(
                "mesh.control.head.version",
                [each(_head_version)],
                unit="{version}",
                description="version of the newest signed control-plane head accepted",
            ),
            gauge(
                "mesh.control.head.expiry",
                [each(_head_expiry)],
                unit="s",
                description="unix time at which the newest accepted head expires",
            ),
            counter(
                "mesh.traffic.events",
                [each(_traffic_events)],
                unit="{event}",
                description="traffic-management events: faults, mirrors, circuits, ejections",
            ),
            gauge(
                "mesh.circuit.state",
                [each(_circuit_state)],
                unit="1",
                description="1 for each destination's circuit state (closed, open, half_open)",
            ),
            gauge(
                "mesh.outlier.ejected",
                [each(_ejected)],
                unit="s",
                description="seconds left of each instance this caller has ejected",
            ),
            gauge(
                "mesh.control.stale",
                [each(_stale)],
                unit="1",
                description="1 when the instance may not run the mesh's current state",
            ),
        ]

    def _each(
        self, read: Callable[[StatsSource, dict[str, str]], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for m in list(self.meshes):
                yield from read(m, {"mesh.agent": m.name, "mesh.instance": m.instance})

        return callback


def _requests(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for key, code, count, _sum in m.signals.totals():
        yield Observation(count, {**base, **_edge_attrs(key), "mesh.code": code})


def _duration_sum(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for key, code, _count, total in m.signals.totals():
        yield Observation(total, {**base, **_edge_attrs(key), "mesh.code": code})


def _duration_buckets(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for key, le, count in m.signals.cumulative_buckets():
        yield Observation(count, {**base, **_edge_attrs(key), "le": le})


def _inflight(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for key, n in m.signals.inflight_by_edge():
        yield Observation(n, {**base, **_edge_attrs(key)})


def _fates(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for fate, n in sorted(m.stats.fates.items()):
        yield Observation(n, {**base, "mesh.fate": fate})


def _traffic_events(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for event, n in sorted(m.traffic.counts.items()):
        yield Observation(n, {**base, "mesh.event": event})


def _circuit_state(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for destination, state in sorted(m.traffic.circuits().items()):
        yield Observation(1, {**base, "mesh.destination": destination, "mesh.state": state})


def _ejected(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for peer, left in sorted(m.traffic.ejected().items()):
        yield Observation(left, {**base, "mesh.peer_instance": peer})


def _decisions(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for (result, rule), n in sorted(m.decisions.items()):
        yield Observation(n, {**base, "mesh.result": result, "mesh.rule": rule})


def _refused(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    for code, n in sorted(m.stats.refused.items()):
        yield Observation(n, {**base, "mesh.code": code})


def _rate_limited(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    yield Observation(m.stats.refused.get("RESOURCE_EXHAUSTED", 0), base)


def _cert_expiry(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    cert = m.identity.certificate
    yield Observation(cert.not_after, {**base, "mesh.serial": cert.serial})


def _cert_left(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    cert = m.identity.certificate
    yield Observation(cert.not_after - time.time(), {**base, "mesh.serial": cert.serial})


def _root_expiry(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    if m.trust_root.not_after is not None:
        yield Observation(m.trust_root.not_after, {**base, "mesh.root": m.trust_root.key_id})


def _head_version(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    if m.head is not None:
        yield Observation(m.head.version, base)


def _head_expiry(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    if m.head is not None:
        yield Observation(m.head.expires_at, base)


def _stale(m: StatsSource, base: dict[str, str]) -> Iterable[Observation]:
    yield Observation(1 if m.stale is not None else 0, base)


_HUBS: WeakKeyDictionary[otel_metrics.MeterProvider, _MetricsHub] = WeakKeyDictionary()


_SOURCES: dict[tuple[str, str], weakref.ref[StatsSource]] = {}
_SOURCES_LOCK = threading.Lock()  # the collector runs on the HTTP server's thread


# --- Prometheus ---------------------------------------------------------------------------------

_EDGE_LABELS = (
    "mesh_agent",
    "mesh_instance",
    "mesh_source",
    "mesh_destination",
    "mesh_endpoint",
    "mesh_reporter",
)
_BASE_LABELS = ("mesh_agent", "mesh_instance")
_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


class MeshCollector:
    """A ``prometheus_client`` collector of every mesh connection of the process.

    It reads the same aggregates as the OpenTelemetry instruments, under the names the
    OpenTelemetry Prometheus exporter gave them (``mesh_requests_total``,
    ``mesh_certificate_expiry_seconds``, ...), with the latency as one histogram per edge,
    ``mesh_request_duration_seconds``, and a ``target_info`` line with the resource's
    attributes (``service_name``, ``service_instance_id``, ...).

    Args:
        resource: attributes for ``target_info`` (none: no ``target_info``).
        sources: the connections to read (default: every one that registered its metrics).
    """

    def __init__(
        self,
        resource: dict[str, str] | None = None,
        sources: Callable[[], list[StatsSource]] = _sources,
    ) -> None:
        self._target = {_LABEL_CHARS.sub("_", k): v for k, v in (resource or {}).items()}
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        if self._target:
            info = InfoMetricFamily("target", "the resource the metrics come from")
            info.add_metric([], self._target)
            yield info
        edge, base = list(_EDGE_LABELS), list(_BASE_LABELS)
        requests = CounterMetricFamily(
            "mesh_requests",
            "requests by source, destination, endpoint, code and reporter",
            labels=[*edge, "mesh_code"],
        )
        duration = HistogramMetricFamily(
            "mesh_request_duration_seconds",
            "request latency by edge, every code (log-scale buckets, 50 us doubling to 52 s)",
            labels=edge,
            unit="seconds",
        )
        inflight = GaugeMetricFamily(
            "mesh_requests_inflight", "requests in flight by edge and reporter", labels=edge
        )
        fates = CounterMetricFamily(
            "mesh_calls_fate",
            "client calls by fate (ok, ok_after_retry, retries_exhausted...)",
            labels=[*base, "mesh_fate"],
        )
        decisions = CounterMetricFamily(
            "mesh_authz_decisions",
            "authorization decisions by result and rule",
            labels=[*base, "mesh_result", "mesh_rule"],
        )
        refused = CounterMetricFamily(
            "mesh_refused",
            "requests refused before a handler, by code",
            labels=[*base, "mesh_code"],
        )
        limited = CounterMetricFamily(
            "mesh_rate_limited", "requests refused by a rate limit", labels=base
        )
        cert_expiry = GaugeMetricFamily(
            "mesh_certificate_expiry_seconds",
            "unix time at which the instance's certificate expires",
            labels=[*base, "mesh_serial"],
            unit="seconds",
        )
        cert_left = GaugeMetricFamily(
            "mesh_certificate_remaining_seconds",
            "seconds until the instance's certificate expires",
            labels=[*base, "mesh_serial"],
            unit="seconds",
        )
        root_expiry = GaugeMetricFamily(
            "mesh_trust_root_expiry_seconds",
            "unix time by which the trust root should be rotated (where known)",
            labels=[*base, "mesh_root"],
            unit="seconds",
        )
        head_version = GaugeMetricFamily(
            "mesh_control_head_version",
            "version of the newest signed control-plane head accepted",
            labels=base,
        )
        head_expiry = GaugeMetricFamily(
            "mesh_control_head_expiry_seconds",
            "unix time at which the newest accepted head expires",
            labels=base,
            unit="seconds",
        )
        stale = GaugeMetricFamily(
            "mesh_control_stale",
            "1 when the instance may not run the mesh's current state",
            labels=base,
        )
        events = CounterMetricFamily(
            "mesh_traffic_events",
            "traffic-management events: faults, mirrors, circuits, ejections",
            labels=[*base, "mesh_event"],
        )
        circuit = GaugeMetricFamily(
            "mesh_circuit_state",
            "1 for each destination's circuit state (closed, open, half_open)",
            labels=[*base, "mesh_destination", "mesh_state"],
        )
        ejected = GaugeMetricFamily(
            "mesh_outlier_ejected_seconds",
            "seconds left of each instance this caller has ejected",
            labels=[*base, "mesh_peer_instance"],
            unit="seconds",
        )
        now = time.time()
        for m in self._sources():
            who = [m.name, m.instance]
            for key, code, count, _sum in m.signals.totals():
                requests.add_metric([*who, *key, code], count)
            for key, buckets, seconds in m.signals.histograms():
                duration.add_metric([*who, *key], buckets, seconds)
            for key, n in m.signals.inflight_by_edge():
                inflight.add_metric([*who, *key], n)
            for fate, n in sorted(m.stats.fates.items()):
                fates.add_metric([*who, fate], n)
            for (result, rule), n in sorted(m.decisions.items()):
                decisions.add_metric([*who, result, rule], n)
            for code, n in sorted(m.stats.refused.items()):
                refused.add_metric([*who, code], n)
            limited.add_metric(who, m.stats.refused.get("RESOURCE_EXHAUSTED", 0))
            cert = m.identity.certificate
            cert_expiry.add_metric([*who, cert.serial], cert.not_after)
            cert_left.add_metric([*who, cert.serial], cert.not_after - now)
            if m.trust_root.not_after is not None:
                root_expiry.add_metric([*who, m.trust_root.key_id], m.trust_root.not_after)
            if m.head is not None:
                head_version.add_metric(who, m.head.version)
                head_expiry.add_metric(who, m.head.expires_at)
            stale.add_metric(who, 1 if m.stale is not None else 0)
            traffic = m.traffic
            for event, n in sorted(traffic.counts.items()):
                events.add_metric([*who, event], n)
            for destination, state in sorted(traffic.circuits().items()):
                circuit.add_metric([*who, destination, state], 1)
            for peer, left in sorted(traffic.ejected().items()):
                ejected.add_metric([*who, peer], left)
        yield from (requests, duration, inflight, fates, decisions, refused, limited)
        yield from (cert_expiry, cert_left, root_expiry, head_version, head_expiry, stale)
        yield from (events, circuit, ejected)


def serve_prometheus(
    port: int,
    addr: str = "0.0.0.0",  # noqa: S104  (what Prometheus exporters do; see observability.md)
    *,
    service_name: str | None = None,
    instance: str | None = None,
) -> WSGIServer:
    """Serve the process's mesh metrics for Prometheus at ``http://addr:port/metrics``, with
    the Python process and GC metrics of ``prometheus_client``.

    Args:
        port: the TCP port (0: any free one; the server's ``server_port`` says which).
        addr: the address to bind (``0.0.0.0``: every IPv4 interface, ``::`` every one,
            ``127.0.0.1`` this host only).
        service_name / instance: the defaults for ``target_info``'s ``service_name`` and
            ``service_instance_id`` (``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
            override them); no ``target_info`` without a service name.

    Returns:
        The HTTP server, serving on a daemon thread (``shutdown()`` stops it).

    Raises:
        OSError: the address cannot be bound.
    """
    from prometheus_client import (
        GC_COLLECTOR,
        PLATFORM_COLLECTOR,
        PROCESS_COLLECTOR,
        CollectorRegistry,
        start_http_server,
    )

    from mesh._observability.resource import service_resource

    resource: dict[str, str] | None = None
    if service_name is not None:
        attrs = service_resource(service_name, instance).attributes
        resource = {k: str(v) for k, v in attrs.items()}
    registry = CollectorRegistry()
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(standard)
    registry.register(MeshCollector(resource))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def _edge_attrs(key: tuple[str, str, str, str]) -> dict[str, str]:
    caller, callee, endpoint, reporter = key
    return {
        "mesh.source": caller,
        "mesh.destination": callee,
        "mesh.endpoint": endpoint,
        "mesh.reporter": reporter,
    }
