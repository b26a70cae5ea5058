"""Ports: the narrow interfaces between the runtime's parts and the layers around it.

- ``Observer``: what the pipelines tell observability (spans, access log, metrics). The runtime
  never imports OpenTelemetry; ``mesh._observability.Telemetry`` implements this port, and
  ``NoObserver`` is the default that costs nothing.
- ``MeshHandle``: what handlers (through ``Context``), lifecycle hooks, governance, the
  ``$SRV`` responders, enrolment and the registry agent may use of a running mesh. ``Mesh``
  satisfies it; nothing below ``Mesh`` holds the ``Mesh`` itself.
- ``StatsSource``: what metrics read at collection time.

Counters shared by the pipelines (``MeshStats``, ``EndpointStats``) live here too, since both
sides of the port read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    import asyncio

    from mesh._core.config import MeshConfig
    from mesh._core.delegation import Delegate, Delegation
    from mesh._core.head import Head
    from mesh._core.identity import CertificateVerifier, Identity, TrustRoot
    from mesh._core.signals import EdgeStats
    from mesh._runtime.agent import Agent
    from mesh._runtime.control import ControlStore
    from mesh._runtime.directory import Directory
    from mesh._runtime.streams import Progress, Stream
    from mesh._transport.base import InboundMessage, Transport

__all__ = [
    "EndpointStats",
    "MeshHandle",
    "MeshIdentity",
    "MeshStats",
    "NoObserver",
    "Observer",
    "Span",
    "StatsSource",
    "TrafficView",
]

M = TypeVar("M", bound=BaseModel)
Span = Any
"""An observer's span handle; opaque to the runtime (``None`` when no span is made)."""


@dataclass(slots=True)
class EndpointStats:
    """Counters of one served endpoint (the NATS services protocol reports them).

    ``requests`` and ``errors`` include the requests refused before the handler (``refused``,
    by code): an operator counting requests sees every one the endpoint was sent.
    """

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    replayed_from_cache: int = 0
    last_error: str = ""
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, code: str) -> None:
        """Count one request refused with ``code`` before its handler ran."""
        self.requests += 1
        self.errors += 1
        self.last_error = code
        self.refused[code] = self.refused.get(code, 0) + 1


@dataclass(slots=True)
class MeshStats:
    """What one mesh connection counts besides the per-edge signals.

    Attributes:
        refused: requests and events refused before a handler, by code.
        dropped_replies: inbox messages dropped (malformed, misaddressed, forged, too large).
        fates: client calls by fate (``ok``, ``ok_after_retry``, ``retries_exhausted``, ...).
        refusal_hints: unsealed refusals received for a pending attempt (kept as hints: they
            never end an attempt).
        no_responders: NATS "no responders" statuses received for a pending attempt (the
            frame is re-sent to the same instance).
        dropped_controls: CONTROL frames dropped (about no call in progress here, from
            another sender, or not opening under the call's pair key).
    """

    refused: dict[str, int] = field(default_factory=dict)
    dropped_replies: int = 0
    fates: dict[str, int] = field(default_factory=dict)
    refusal_hints: int = 0
    no_responders: int = 0
    dropped_controls: int = 0

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def fate(self, name: str) -> None:
        self.fates[name] = self.fates.get(name, 0) + 1


class Observer(Protocol):
    """Hooks the pipelines call; each must be cheap when its feature is off."""

    access_log: bool
    """Whether every served request is logged (policy can also ask per endpoint)."""

    def start_client(
        self, agent: str, endpoint: str, traceparent: str | None, tracestate: str | None
    ) -> tuple[Span, str | None, str | None]:
        """A CLIENT span for one call; returns it and the trace context to send."""
        ...

    def attempt(self, span: Span, attempt: int, subject: str, message_id: bytes) -> None:
        """One attempt of a call was sent."""
        ...

    def retry(self, span: Span, attempt: int, code: str, fate: str, delay: float) -> None:
        """An attempt failed with ``code``; ``fate`` says whether the call goes on."""
        ...

    def end(self, span: Span, code: str, fate: str | None = None, rule: str | None = None) -> None:
        """The call (or served request) ended with ``code``; ``rule`` names the policy rule
        of a denial."""
        ...

    def traffic(
        self,
        span: Span,
        event: str,
        attrs: Mapping[str, str],
        access: Mapping[str, Any] | None = None,
    ) -> None:
        """A traffic-management event of a call (``fault_delay``, ``fault_abort``,
        ``circuit_opened``, ``circuit_closed``, ``ejected``): a span event; with ``access``
        (an injected fault, when the access log is on), also a caller-side access-log line."""
        ...

    def start_server(
        self,
        agent: str,
        endpoint: str,
        subject: str,
        message_id: bytes,
        caller: str,
        traceparent: str | None,
        tracestate: str | None,
    ) -> tuple[Span, str | None, str | None]:
        """A SERVER span continuing the caller's trace; returns the context for nested calls."""
        ...

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
        rule: str | None = None,
        origin: str | None = None,
    ) -> None:
        """One access-log line for a served or refused request (``origin``: who a delegated
        call was made for, e.g. the principal a gateway named); never the payload."""
        ...

    def register_metrics(self, source: StatsSource) -> None:
        """Report ``source``'s aggregates from now on."""
        ...


class NoObserver:
    """An ``Observer`` that records nothing: no spans, no access log, no metrics."""

    access_log = False

    def start_client(
        self, agent: str, endpoint: str, traceparent: str | None, tracestate: str | None
    ) -> tuple[Span, str | None, str | None]:
        return None, traceparent, tracestate

    def attempt(self, span: Span, attempt: int, subject: str, message_id: bytes) -> None:
        pass

    def retry(self, span: Span, attempt: int, code: str, fate: str, delay: float) -> None:
        pass

    def end(self, span: Span, code: str, fate: str | None = None, rule: str | None = None) -> None:
        pass

    def traffic(
        self,
        span: Span,
        event: str,
        attrs: Mapping[str, str],
        access: Mapping[str, Any] | None = None,
    ) -> None:
        pass

    def start_server(
        self,
        agent: str,
        endpoint: str,
        subject: str,
        message_id: bytes,
        caller: str,
        traceparent: str | None,
        tracestate: str | None,
    ) -> tuple[Span, str | None, str | None]:
        return None, traceparent, tracestate

    def log_access(self, **fields: Any) -> None:
        pass

    def register_metrics(self, source: StatsSource) -> None:
        pass


class MeshIdentity(Protocol):
    """Who one mesh connection is: what both views below start with."""

    @property
    def name(self) -> str: ...
    @property
    def instance(self) -> str: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def trust_root(self) -> TrustRoot: ...


class TrafficView(Protocol):
    """What a caller's traffic management shows (``mesh._runtime.traffic.Traffic``)."""

    counts: dict[str, int]

    def circuits(self) -> dict[str, str]: ...

    def ejected(self) -> dict[str, float]: ...


class StatsSource(MeshIdentity, Protocol):
    """What metrics read of one mesh connection at collection time."""

    @property
    def signals(self) -> EdgeStats: ...
    @property
    def stats(self) -> MeshStats: ...
    @property
    def decisions(self) -> Counter[tuple[str, str]]: ...
    @property
    def head(self) -> Head | None: ...
    @property
    def stale(self) -> str | None: ...
    @property
    def traffic(self) -> TrafficView: ...


class MeshHandle(MeshIdentity, Protocol):
    """What a running mesh offers to handlers, hooks and control-plane code."""

    @property
    def config(self) -> MeshConfig: ...
    @property
    def agent(self) -> Agent | None: ...
    @property
    def verifier(self) -> CertificateVerifier: ...
    @property
    def control(self) -> ControlStore: ...
    @property
    def directory(self) -> Directory: ...
    @property
    def transport(self) -> Transport: ...

    async def request(
        self,
        agent: str,
        endpoint: str,
        body: BaseModel,
        reply_type: type[M],
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        idle_timeout: float | None = None,
        chain: Delegation | None = None,
        delegate: Delegate | None = None,
    ) -> M: ...

    def stream(
        self,
        agent: str,
        endpoint: str,
        body: BaseModel,
        chunk_type: type[M],
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        credit: int | None = None,
        idle_timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        metadata: Mapping[str, str] | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        chain: Delegation | None = None,
        delegate: Delegate | None = None,
    ) -> Stream[M]: ...

    async def publish(
        self,
        topic: str,
        event: BaseModel,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
        chain: Delegation | None = None,
    ) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    async def subscribe_raw(
        self, subject: str, handler: Callable[[InboundMessage], Awaitable[None]]
    ) -> None: ...
