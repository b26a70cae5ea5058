"""The runtime: ``Mesh``, one connection per agent instance, with the client and server pipelines.

Server pipeline, cheapest rejection first (``docs/protocol.md``, Callee processing): decode the
header, body size, kind, addressing, time window and replay check, deadline (expired requests
are dropped unanswered), readable-header match, certificate (cached; expiry, revocation),
rate-limit peek, open the seal, record the id; then, answered sealed: endpoint lookup,
authorization, rate-limit take; then queue for the endpoint's concurrency limit (bounded by the
deadline) and run the handler. Nothing reaches a handler unless every step passed.

Client pipeline: names, policy check, deadline, encode and size check, pick an instance (power
of two choices), seal, send to the instance's own subject, await the sealed reply on the
connection's inbox; retry retryable failures with full-jitter backoff within the retry budget
and the deadline: idempotent calls on another instance, keyed calls on the same one until
signed evidence says it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import structlog
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, TracerProvider
from pydantic import BaseModel, ValidationError

from mesh._core.config import MeshConfig
from mesh._core.crypto import (
    NONCE_LEN,
    SIG_LEN,
    TAG_LEN,
    PairKeys,
    ReplayGuard,
    open_frame,
    seal_frame,
    sign_frame,
    verify_frame,
)
from mesh._core.envelope import (
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    MAGIC,
    MAX_HEADER,
    PREFIX,
    Header,
    Kind,
    check_trace_context,
    decode_frame,
    encode_frame,
)
from mesh._core.identity import Certificate, CertificateVerifier, Identity, TrustRoot, validate_name
from mesh._core.policy import EndpointPolicy
from mesh._core.resilience import (
    Backoff,
    ConcurrencyLimit,
    LeastLoadedPicker,
    ReplyCache,
    RetryBudget,
    cancel_and_wait,
)
from mesh._core.signals import SIGNALS_TOPIC, EdgeKey, EdgeStats
from mesh._observability.telemetry import Telemetry
from mesh._runtime.agent import Agent, Context, EndpointSpec, EventSpec, Peer
from mesh._runtime.control import ControlStore
from mesh._runtime.directory import (
    STATE_DRAINING,
    STATE_SERVING,
    Directory,
    EndpointInfo,
    InstanceRecord,
    encode_record,
)
from mesh._runtime.governance import Governance
from mesh._runtime.services import serve_services
from mesh._transport.base import InboundMessage, Subscription, Transport, is_no_responders
from mesh._transport.nats import NatsTransport
from mesh.errors import (
    DeadlineExceeded,
    DecodeError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    MessageTooLarge,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_code,
)

__all__ = ["EndpointStats", "Mesh", "connect"]

log = structlog.get_logger("mesh")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
OK = "OK"
NO_ID = bytes(16)
MAX_IDEMPOTENCY_KEY = 256
# Sealing adds a 24-byte nonce and a 16-byte tag; headers are at most 16 KiB.
# A frame adds to its body: a 4-byte prefix, a header of at most 16 KiB, and a 24-byte nonce
# with a 16-byte tag (sealed) or a 64-byte signature (events).
FRAME_OVERHEAD = 4 + 16 * 1024 + 64

Authorizer = Callable[[Peer, str], None]
"""Called with the caller and endpoint before a handler runs; raises ``PermissionDenied``."""


@dataclass(slots=True)
class EndpointStats:
    """Counters of one served endpoint (the NATS services protocol reports them)."""

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    replayed_from_cache: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _Pending:
    fut: asyncio.Future[bytes]
    request_id: bytes
    record: InstanceRecord
    key: bytes


@dataclass(slots=True)
class _Stats:
    refused: dict[str, int] = field(default_factory=dict)
    dropped_replies: int = 0
    fates: dict[str, int] = field(default_factory=dict)

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def fate(self, name: str) -> None:
        self.fates[name] = self.fates.get(name, 0) + 1


class _NotDelivered(Unavailable):
    """Nothing was sent (no live instance), so retrying is safe for any endpoint."""


class _InstanceDown(Unavailable):
    """The instance seems gone: "no responders", or its heartbeats stopped. The first signal
    is unauthenticated, so it never by itself moves a keyed call to another instance."""


def _too_large(size: int) -> MessageTooLarge:
    return MessageTooLarge(f"a body of {size} bytes exceeds the limit of this agent")


def _record_key(record: InstanceRecord) -> str:
    return record.key


def _remote_error(code: str, body: bytes) -> MeshError:
    """The exception for a sealed error reply; fields of the wrong type are ignored."""
    try:
        detail = json.loads(body)
    except ValueError:
        detail = None
    if not isinstance(detail, dict):
        return Internal(f"malformed error reply ({code})")
    message, rule, after = detail.get("message"), detail.get("rule"), detail.get("retry_after")
    return error_from_code(
        code,
        message if isinstance(message, str) else "",
        rule=rule if isinstance(rule, str) else None,
        retry_after=float(after)
        if isinstance(after, int | float) and not isinstance(after, bool) and after >= 0
        else None,
    )


def _error_body(exc: MeshError) -> bytes:
    wire = exc.to_wire()
    wire.pop("code", None)
    return json.dumps(wire).encode()


class Mesh:
    """A connection to the mesh as one agent instance.

    Args:
        identity: this instance's keys and certificate.
        config: servers, prefix, timeouts, retry policy, limits.
        agent: the agent definition to serve (``None`` for a caller-only client).
        transport: the broker connection (default: nats-py to ``config.servers``).
        authorizer: replaces the policy's decision for each authenticated request.
        trust_root: the trust root with its private key, for the registry (which signs
            policy, certificates and audit records); others need only the public key.
        tracer_provider / meter_provider: OpenTelemetry providers (default: the global ones;
            with no tracer provider installed no span is made).

    Use as ``async with Mesh(...) as m:``; nothing is sent or served before ``start`` returns.
    """

    def __init__(
        self,
        identity: Identity,
        config: MeshConfig | None = None,
        *,
        agent: Agent | None = None,
        transport: Transport | None = None,
        authorizer: Authorizer | None = None,
        trust_root: TrustRoot | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.identity = identity
        self.config = config = config or MeshConfig()
        if agent is not None and agent.name != identity.agent:
            raise InvalidArgument(
                f"identity is for agent {identity.agent!r}, cannot serve agent {agent.name!r}"
            )
        self.agent = agent
        self.transport: Transport = transport or NatsTransport(
            config.servers,
            name=f"{identity.agent}.{identity.instance}",
            connect_timeout=config.timeouts.connect,
        )
        self.authorizer = authorizer
        if trust_root is not None and trust_root.public_key != identity.root_public_key:
            raise InvalidArgument("trust_root is not the root that issued this identity")
        self.trust_root = trust_root or TrustRoot.from_public(identity.root_public_key)
        self.control = ControlStore(
            self.transport, config.prefix, self.trust_root, replicas=config.directory.replicas
        )
        self.governance = Governance(self)
        self.signals = EdgeStats(identity.agent, identity.instance)
        self.telemetry = Telemetry(
            self,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            access_log=config.access_log,
        )
        self.certificate_listeners: list[Callable[[Identity], None]] = []
        self.name = identity.agent
        self.instance = identity.instance
        self._cert_raw = identity.certificate.raw
        self._pair = PairKeys(identity.keys.box)
        self.verifier = CertificateVerifier(identity.root_public_key)
        self._replay = ReplayGuard(config.timeouts.replay_window)
        retry = config.retry
        self._backoff = Backoff(retry.backoff_base, retry.backoff_cap)
        self._budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_s, retry.budget_ttl)
        self._picker: LeastLoadedPicker[str] = LeastLoadedPicker()
        self._replies = ReplyCache(config.limits.reply_cache_ttl)
        self._max_body = config.limits.max_body
        self._max_frame = config.limits.max_body + FRAME_OVERHEAD
        self._max_sealed = config.limits.max_body + NONCE_LEN + TAG_LEN
        self._pending: dict[str, _Pending] = {}
        self._checked_names: set[tuple[str, str]] = set()
        self._tokens = itertools.count(1)
        self._inbox = ""
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._limits: dict[str, ConcurrencyLimit] = {}
        self._directory: Directory | None = None
        self._kv: Any = None
        self._state = "new"
        self.stats = _Stats()
        self.endpoint_stats: dict[str, EndpointStats] = {}
        self.started_at = 0.0
        self._rpc_prefix = f"{config.prefix}.rpc."
        self.bucket = f"{config.prefix}-directory"

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def directory(self) -> Directory:
        if self._directory is None:
            raise FailedPrecondition("mesh is not started")
        return self._directory

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def start(self) -> None:
        """Connect, load the directory, then (for an agent) subscribe and register.

        Raises:
            Unavailable: NATS or JetStream could not be reached.
            FailedPrecondition: the mesh was already started or closed.
        """
        if self._state != "new":
            raise FailedPrecondition(f"mesh cannot start from state {self._state!r}")
        self._state = "starting"
        timeouts = self.config.timeouts
        await self.transport.connect()
        self._inbox = self.transport.new_inbox()
        self._subs.append(await self.transport.subscribe(f"{self._inbox}.*", self._on_reply))
        ttl = self.config.directory.ttl
        deadline = time.monotonic() + timeouts.connect
        self._kv = await _retry_unavailable(
            lambda: self.transport.key_value(
                self.bucket, ttl=max(3 * ttl, 10.0), replicas=self.config.directory.replicas
            ),
            deadline,
        )
        self._directory = Directory(
            self._kv.watch, self.verifier, ttl=ttl, on_dead=self._instance_dead
        )
        await self._directory.start(timeouts.connect)
        await self.governance.start(self.control, max(0.1, deadline - time.monotonic()))
        if self.agent is not None:
            await self._serve_subscriptions(self.agent)
            if self.config.services:
                await serve_services(self)
            self._state = "ready"  # start hooks may call out before the agent is announced
            for hook in self.agent.startup:
                await hook(self)
            await _retry_unavailable(self._register, deadline)
            self._heartbeat = asyncio.create_task(self._beat(), name="mesh-heartbeat")
        self.transport.on_reconnect(self._reconnected)
        if self.config.signals_interval > 0:
            self._reporter = asyncio.create_task(self._report_signals(), name="mesh-signals")
        self.telemetry.register_metrics()
        await self.transport.flush(timeouts.connect)
        self.started_at = time.time()
        self._state = "ready"

    async def _reconnected(self) -> None:
        if self._directory is not None:
            self._directory.restart_watch()
        self.governance.restart_watches()
        if self.agent is not None and self._state == "ready":
            with contextlib.suppress(MeshError):
                await self._register()

    async def drain(self) -> None:
        """Stop gracefully: deregister, stop listening, let in-flight work finish (bounded),
        then close. Safe to call twice."""
        if self._state in ("closed", "draining"):
            return
        was_serving = self._state == "ready" and self.agent is not None
        self._state = "draining"
        await cancel_and_wait((self._heartbeat, self._reporter))
        key = f"{self.name}.{self.instance}"
        if was_serving:
            # A signed announcement: callers stop picking this instance for new calls. In-flight
            # work still finishes here (a keyed call that times out meanwhile may move and run
            # twice: the documented window).
            with contextlib.suppress(MeshError):
                await self._kv.put(key, self._record(STATE_DRAINING))
            await asyncio.sleep(self.config.directory.drain_grace)
        inbox_sub = self._subs[0] if self._subs else None
        for sub in self._subs[1:]:
            with contextlib.suppress(Exception):
                await sub.drain()  # stop interest, but handle what was already delivered
        waiting = [t for t in self._tasks if not t.done()]
        if waiting:
            _done, late = await asyncio.wait(waiting, timeout=self.config.timeouts.drain)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)  # let them answer UNAVAILABLE
        if self.agent is not None:
            for hook in self.agent.shutdown:
                try:
                    await hook(self)
                except Exception:
                    log.exception("mesh.stop_hook_failed", agent=self.name)
        await self.governance.close()
        if was_serving:
            with contextlib.suppress(MeshError):
                await self._kv.delete(key)
        if inbox_sub is not None:
            with contextlib.suppress(Exception):
                await inbox_sub.unsubscribe()
        if self._directory is not None:
            await self._directory.close()
        await self.transport.close()
        self._state = "closed"

    close = drain

    def _require_ready(self) -> None:
        # While draining, in-flight handlers may still make nested calls.
        if self._state != "ready" and self._state != "draining":
            raise FailedPrecondition(f"mesh is {self._state}, not ready")

    async def wait_for(self, agent: str, timeout: float = 10.0) -> None:
        """Wait until ``agent`` has a live instance in the directory.

        Raises:
            Unavailable: none appeared within ``timeout``.
        """
        self._require_ready()
        await self.directory.wait_for(agent, timeout)

    # --- directory registration --------------------------------------------------------------

    def _record(self, state: str = STATE_SERVING) -> bytes:
        assert self.agent is not None
        return encode_record(
            self.identity.keys.signing,
            self.identity.certificate,
            endpoints=[EndpointInfo(s.name, s.idempotent) for s in self.agent.endpoints.values()],
            version=self.agent.version,
            labels=self.agent.labels,
            ts=time.time(),
            state=state,
            policy_revision=self.governance.revision,
            policy_error=self.governance.error,
        )

    async def subscribe_raw(
        self, subject: str, handler: Callable[[InboundMessage], Awaitable[None]]
    ) -> None:
        """Subscribe a plain handler for a control-plane protocol (e.g. enrolment); it is
        drained with the agent."""
        self._subs.append(await self.transport.subscribe(subject, handler))

    async def _report_signals(self) -> None:
        """Send this instance's golden signals per edge to the registry, periodically."""
        while self._state == "ready" or self._state == "starting":
            await asyncio.sleep(self.config.signals_interval)
            try:
                report = self.signals.snapshot_and_reset(time.time())
                if report.edges:
                    await self.publish(SIGNALS_TOPIC, report)
            except Exception as exc:  # reporting must never stop
                log.warning("mesh.signals_report_failed", error_type=type(exc).__name__)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run background work that drain waits for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def policy_changed(self) -> None:
        """Acknowledge (or refuse) a policy revision in the directory record at once."""
        if self.agent is not None and self._state == "ready":
            self.spawn(self._register_quietly())

    async def _register_quietly(self) -> None:
        try:
            await self._register()
        except MeshError as exc:
            log.warning("mesh.register_failed", error=exc.message)

    async def replace_certificate(self, cert: Certificate) -> None:
        """Switch to a renewed certificate for the same keys; callers see it at once."""
        self.identity = Identity(
            keys=self.identity.keys, certificate=cert, root_public_key=self.identity.root_public_key
        )
        self._cert_raw = cert.raw
        for listener in self.certificate_listeners:
            listener(self.identity)
        if self.agent is not None and self._state == "ready":
            await self._register_quietly()

    async def _register(self) -> None:
        await self._kv.put(f"{self.name}.{self.instance}", self._record())

    async def _beat(self) -> None:
        while self._state == "ready":
            await asyncio.sleep(self.config.directory.heartbeat)
            await self._register_quietly()

    def _instance_dead(self, record: InstanceRecord) -> None:
        """Fail attempts waiting on an instance that is gone, so they retry elsewhere now."""
        for p in list(self._pending.values()):
            if p.record.key == record.key and not p.fut.done():
                p.fut.set_exception(_InstanceDown(f"instance {record.key} went away"))

    # --- client pipeline ---------------------------------------------------------------------

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
    ) -> M:
        """Call ``endpoint`` of ``agent`` and return its reply as ``reply_type``.

        Args:
            agent: callee agent name.
            endpoint: endpoint name.
            body: the request model.
            reply_type: the model the reply is parsed into.
            timeout: seconds from now (default ``Timeouts.request``).
            deadline: absolute unix time; the earlier of the two applies (nested calls pass
                their inherited deadline here).
            idempotency_key: makes a non-idempotent call safe to retry; the callee runs it
                at most once per key (per instance, within the reply-cache TTL).
            traceparent / tracestate: W3C trace context to carry.

        Raises:
            MeshError: the subclass matching the failure (``PermissionDenied``,
                ``DeadlineExceeded``, ``Unavailable``, ``Internal``, ...).
        """
        self._require_ready()
        if (agent, endpoint) not in self._checked_names:
            validate_name("agent", agent)
            validate_name("endpoint", endpoint)
            self._checked_names.add((agent, endpoint))
        if traceparent is not None or tracestate is not None:
            check_trace_context(traceparent, tracestate)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency keys are 1 to {MAX_IDEMPOTENCY_KEY} characters long"
            )
        gov = self.governance
        gov.check_outgoing(agent, endpoint)
        settings = gov.endpoint_settings(agent, endpoint)
        if timeout is None:
            timeout = gov.engine.timeout_for(agent, endpoint) or self.config.timeouts.request
        now = time.time()
        limit = now + timeout
        dl = limit if deadline is None else min(limit, deadline)
        if dl <= now:
            self.stats.fate("deadline_exceeded")
            raise DeadlineExceeded(f"deadline already passed before calling {agent}.{endpoint}")
        plaintext = body.__pydantic_serializer__.to_json(body)
        if len(plaintext) > self._max_body:
            raise MessageTooLarge(
                f"request body is {len(plaintext)} bytes, the limit is {self._max_body}"
            )
        self._budget.record_request()
        key: EdgeKey = (self.name, agent, endpoint, "client")
        self.signals.enter(key)
        span, traceparent, tracestate = self.telemetry.start_client(
            agent, endpoint, traceparent, tracestate
        )
        started = time.perf_counter()
        code = OK
        try:
            payload = await self._call(
                agent,
                endpoint,
                plaintext,
                dl,
                settings,
                idempotency_key,
                traceparent,
                tracestate,
                span,
            )
        except MeshError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = Internal.code
            raise
        finally:
            self.signals.finish(key, code, time.perf_counter() - started)
            self.telemetry.end(span, code)
        try:
            return reply_type.model_validate_json(payload)
        except ValidationError as exc:
            raise InvalidArgument(
                f"reply of {agent}.{endpoint} does not match {reply_type.__name__}: "
                f"{exc.error_count()} validation error(s)"
            ) from None

    async def _call(
        self,
        agent: str,
        endpoint: str,
        plaintext: bytes,
        dl: float,
        settings: EndpointPolicy | None,
        idempotency_key: str | None,
        traceparent: str | None,
        tracestate: str | None,
        span: Span | None,
    ) -> bytes:
        """Attempts of one call, with retries, until a reply, a final error or the deadline."""
        attempts, per_try = self.config.retry.attempts, self.config.retry.per_try_timeout
        if settings is not None and settings.retries is not None:
            attempts = settings.retries.attempts
            per_try = settings.retries.per_try_timeout or per_try
        avoid: set[str] = set()
        pinned: InstanceRecord | None = None
        attempt = 0
        while True:
            attempt += 1
            record: InstanceRecord | None = None
            info: EndpointInfo | None = None
            try:
                if attempt > 1 and time.time() >= dl:
                    raise DeadlineExceeded(f"deadline of {agent}.{endpoint} passed")
                if pinned is not None and self.directory.is_gone(pinned.key):
                    avoid.add(pinned.key)
                    pinned = None
                record = pinned or self._pick(agent, endpoint, avoid)
                info = record.endpoints.get(endpoint)
                if info is None:
                    raise NotFound(f"agent {agent!r} has no endpoint {endpoint!r}")
                payload = await self._attempt(
                    record,
                    endpoint,
                    plaintext,
                    dl,
                    per_try,
                    attempt,
                    idempotency_key,
                    traceparent,
                    tracestate,
                    span,
                )
            except MeshError as exc:
                idempotent = info is not None and info.idempotent
                may_retry = (
                    isinstance(exc, _NotDelivered) or idempotent or idempotency_key is not None
                )
                delay, fate = self._retry_delay(exc, may_retry, attempt, attempts, dl)
                Telemetry.retry(span, attempt, exc.code, fate, delay or 0.0)
                if delay is None:
                    self.stats.fate(fate)
                    raise
                if record is not None and idempotent:
                    avoid.add(record.key)  # any instance will do: prefer another one
                elif record is not None:
                    # A keyed call may be running there, and failure signals (refusals, "no
                    # responders") are unauthenticated. Its reply cache answers a retry at
                    # once, so stay, and move only on signed evidence that it is gone.
                    pinned = record
                    if isinstance(exc, _InstanceDown):
                        # Wait (bounded) for signed evidence; without it, ask the same instance
                        # again: if it lives, its reply cache answers.
                        wait = min(self.config.directory.ttl, dl - time.time())
                        await self.directory.wait_gone(record.key, wait)
                if record is not None and isinstance(exc, ResourceExhausted) and exc.retry_after:
                    self._picker.penalize(record.key, exc.retry_after)
                await asyncio.sleep(delay)
                continue
            self.stats.fate("ok" if attempt == 1 else "ok_after_retry")
            return payload

    def _retry_delay(
        self, exc: MeshError, may_retry: bool, attempt: int, attempts: int, dl: float
    ) -> tuple[float | None, str]:
        """Seconds to wait before retrying (``None`` to give up), and the call's fate."""
        if not exc.retryable or not may_retry:
            return None, "deadline_exceeded" if isinstance(exc, DeadlineExceeded) else "failed"
        if attempt >= attempts:
            return None, "retries_exhausted"
        delay = self._backoff.delay(attempt)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        if time.time() + delay >= dl:
            return None, "deadline_exceeded"
        if not self._budget.try_spend():
            return None, "retry_skipped_budget"
        return delay, "retried"

    def _pick(self, agent: str, endpoint: str, avoid: set[str]) -> InstanceRecord:
        candidates = self.directory.instances(agent)
        if not candidates:
            raise _NotDelivered(f"no live instance of agent {agent!r}")
        if len(candidates) > 1 and any(endpoint not in r.endpoints for r in candidates):
            # During a rolling upgrade some instances may not serve the endpoint yet.
            candidates = [r for r in candidates if endpoint in r.endpoints] or candidates
        if avoid:
            candidates = [r for r in candidates if r.key not in avoid] or candidates
        return self._picker.pick(candidates, _record_key)

    async def _attempt(
        self,
        record: InstanceRecord,
        endpoint: str,
        plaintext: bytes,
        dl: float,
        per_try: float | None,
        attempt: int,
        idempotency_key: str | None,
        traceparent: str | None,
        tracestate: str | None,
        span: Span | None,
    ) -> bytes:
        rid = os.urandom(16)
        dl_ms = int(dl * 1000)
        hdr: dict[str, Any] = {
            "k": Kind.REQUEST.value,
            "id": rid,
            "ts": int(time.time() * 1000),
            "fa": self.name,
            "fi": self.instance,
            "ta": record.agent,
            "ti": record.instance,
            "ep": endpoint,
            "dl": dl_ms,
            "at": attempt,
            "ct": self._cert_raw,
        }
        headers = {HDR_DEADLINE: str(dl_ms)}
        if idempotency_key is not None:
            hdr["ik"] = idempotency_key
        if traceparent is not None:
            hdr["tp"] = headers[HDR_TRACEPARENT] = traceparent
        if tracestate is not None:
            hdr["tst"] = headers[HDR_TRACESTATE] = tracestate
        hb = msgpack.packb(hdr, use_bin_type=True)
        if len(hb) > MAX_HEADER:
            raise InvalidArgument(f"request header of {len(hb)} bytes exceeds {MAX_HEADER}")
        aad = PREFIX.pack(MAGIC, len(hb)) + hb
        key = self._pair.get(record.certificate.box_pk)
        frame = seal_frame(key, aad, plaintext)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        token = str(next(self._tokens))
        self._pending[token] = _Pending(fut, rid, record, key)
        picker_key = record.key
        self._picker.acquire(picker_key)
        wait = dl - time.time()
        timed_out_by_deadline = per_try is None or per_try >= wait
        if not timed_out_by_deadline and per_try is not None:
            wait = per_try
        timer = loop.call_later(max(0.0, wait), _expire, fut, timed_out_by_deadline)
        subject = f"{self._rpc_prefix}{record.agent}.{record.instance}.{endpoint}"
        if span is not None:
            Telemetry.attempt(span, attempt, subject, rid)
        try:
            await self.transport.publish(
                subject, frame, reply=f"{self._inbox}.{token}", headers=headers
            )
            return await fut
        finally:
            timer.cancel()
            del self._pending[token]
            self._picker.release(picker_key)

    async def _on_reply(self, msg: InboundMessage) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        p = self._pending.get(token)
        if p is None or p.fut.done():
            return  # late, duplicate or stray
        if is_no_responders(msg):
            self._no_responders(p)
            return
        data = msg.data
        try:
            hdr, end = decode_frame(data)
        except DecodeError:
            self.stats.dropped_replies += 1
            return
        if hdr.kind == Kind.REFUSAL and hdr.reply_to == p.request_id:
            # Unsealed: the callee could not authenticate the request. Trusted only as a hint.
            p.fut.set_exception(
                error_from_code(
                    hdr.status or "INTERNAL",
                    hdr.message or "refused",
                    rule=hdr.rule,
                    retry_after=hdr.retry_after_ms / 1000 if hdr.retry_after_ms else None,
                )
            )
            return
        if (
            hdr.kind != Kind.REPLY
            or hdr.reply_to != p.request_id
            or hdr.from_instance != p.record.instance
            or hdr.to_instance != self.instance
        ):
            self.stats.dropped_replies += 1
            return
        if len(data) - end > self._max_sealed:
            self.stats.dropped_replies += 1  # over our limit: not opened, like a forgery
            return
        try:
            plaintext = open_frame(p.key, data, end)
        except Unauthenticated:
            self.stats.dropped_replies += 1  # forged or altered; keep waiting for the real one
            return
        if hdr.status == OK:
            p.fut.set_result(plaintext)
            return
        p.fut.set_exception(_remote_error(hdr.status or Internal.code, plaintext))

    def _no_responders(self, p: _Pending) -> None:
        record = p.record
        p.fut.set_exception(_InstanceDown(f"no responders at instance {record.key}"))
        live = self.directory.get(record.key)
        if live is not None and live.state != STATE_DRAINING:
            # Listed as serving but not subscribed: the process is gone. Stop picking it, and
            # fail other attempts waiting on it so they retry elsewhere at once.
            self.directory.eject(record.key, self.config.directory.ttl * 2)
            self._instance_dead(record)

    # --- events ------------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        event: BaseModel,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        """Publish a signed event on ``topic`` as this agent.

        Raises:
            MessageTooLarge: the event exceeds ``Limits.max_body``.
        """
        self._require_ready()
        validate_name("topic", topic)
        check_trace_context(traceparent, tracestate)
        payload = event.__pydantic_serializer__.to_json(event)
        if len(payload) > self._max_body:
            raise MessageTooLarge(
                f"event body is {len(payload)} bytes, the limit is {self._max_body}"
            )
        header = Header(
            kind=Kind.EVENT,
            id=os.urandom(16),
            ts=int(time.time() * 1000),
            from_agent=self.name,
            from_instance=self.instance,
            name=topic,
            cert=self._cert_raw,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        frame, _ = encode_frame(header, payload)
        frame += sign_frame(self.identity.keys.signing, frame)
        headers: dict[str, str] = {}
        if traceparent is not None:
            headers[HDR_TRACEPARENT] = traceparent
        if tracestate is not None:
            headers[HDR_TRACESTATE] = tracestate
        await self.transport.publish(
            f"{self.config.prefix}.evt.{self.name}.{topic}", frame, headers=headers or None
        )

    # --- server pipeline ---------------------------------------------------------------------

    async def _serve_subscriptions(self, agent: Agent) -> None:
        limits = self.config.limits
        for spec in agent.endpoints.values():
            self._limits[spec.name] = ConcurrencyLimit(
                spec.concurrency or limits.endpoint_concurrency
            )
            self.endpoint_stats[spec.name] = EndpointStats()
        if agent.endpoints:
            subject = f"{self._rpc_prefix}{self.name}.{self.instance}.*"
            self._subs.append(await self.transport.subscribe(subject, self._on_request))
        by_subject: dict[str, list[EventSpec]] = {}
        for ev in agent.events:
            by_subject.setdefault(f"{self.config.prefix}.evt.{ev.agent}.{ev.topic}", []).append(ev)
        for subject, specs in by_subject.items():
            self._subs.append(await self.transport.subscribe(subject, self._event_handler(specs)))

    async def _refuse(self, msg: InboundMessage, request_id: bytes, exc: MeshError) -> None:
        self.stats.refuse(exc.code)
        if not msg.reply:
            return
        header = Header(
            kind=Kind.REFUSAL,
            id=os.urandom(16),
            ts=int(time.time() * 1000),
            reply_to=request_id,
            status=exc.code,
            message=exc.message,
            rule=exc.rule,
            retry_after_ms=max(1, math.ceil(exc.retry_after * 1000))
            if exc.retry_after is not None
            else None,
        )
        with contextlib.suppress(MeshError):
            await self.transport.publish(msg.reply, encode_frame(header)[0])

    async def _on_request(self, msg: InboundMessage) -> None:
        data = msg.data
        try:
            hdr, end = decode_frame(data)  # bounded: a header is at most 16 KiB
        except DecodeError as exc:
            too_big = len(data) > self._max_frame
            await self._refuse(msg, NO_ID, _too_large(len(data)) if too_big else exc)
            return
        try:
            if len(data) - end > self._max_sealed:
                raise _too_large(len(data) - end)
            if hdr.kind != Kind.REQUEST:
                raise DecodeError(f"expected a request frame, got kind {hdr.kind}")
            peer, key, plaintext = self._admit(msg, hdr, end)
        except DeadlineExceeded:
            # The caller has stopped waiting (its own timer fired): nothing to answer.
            self.stats.refuse(DeadlineExceeded.code)
            return
        except MeshError as exc:
            await self._refuse(msg, hdr.id, exc)
            return
        if not msg.reply:
            return
        # From here on the caller is authenticated: errors travel sealed.
        spec = self.agent.endpoints.get(hdr.name or "") if self.agent else None
        try:
            if spec is None:
                raise NotFound(f"agent {self.name!r} has no endpoint {hdr.name!r}")
            if self.authorizer is not None:
                self.authorizer(peer, spec.name)
            else:
                self.governance.authorize(peer, spec.name)
            self.governance.rate_take(peer.agent, spec.name)
        except MeshError as exc:
            self.stats.refuse(exc.code)
            # Unknown endpoint names are folded into one label: callers cannot grow the table.
            endpoint = spec.name if spec is not None else "(unknown)"
            self.signals.record(peer.agent, self.name, endpoint, "server", exc.code, 0.0)
            await self._send_reply(msg.reply, hdr, key, exc.code, _error_body(exc))
            return
        task = asyncio.create_task(
            self._serve(spec, hdr, peer, key, plaintext, msg.reply, msg.subject, len(msg.data))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _admit(self, msg: InboundMessage, hdr: Header, end: int) -> tuple[Peer, bytes, bytes]:
        """Authenticate a request, cheapest checks first; raises the error to refuse with.

        Returns:
            ``(caller, pair key, plaintext body)``.
        """
        if hdr.to_agent != self.name or hdr.to_instance != self.instance:
            raise Unauthenticated(
                f"request addressed to {hdr.to_agent}.{hdr.to_instance}, "
                f"this is {self.name}.{self.instance}"
            )
        if msg.subject.rpartition(".")[2] != hdr.name:
            raise Unauthenticated("subject does not match the sealed endpoint")
        self._replay.check(hdr.id, hdr.ts)
        assert hdr.deadline is not None
        if hdr.deadline <= time.time() * 1000:
            raise DeadlineExceeded("request deadline passed before it arrived")
        if hdr.traceparent is not None or hdr.tracestate is not None:
            check_trace_context(hdr.traceparent, hdr.tracestate)
        nats_headers = msg.headers or {}
        if (
            nats_headers.get(HDR_DEADLINE) != str(hdr.deadline)
            or nats_headers.get(HDR_TRACEPARENT) != hdr.traceparent
            or nats_headers.get(HDR_TRACESTATE) != hdr.tracestate
        ):
            raise Unauthenticated("readable NATS headers differ from the sealed header")
        assert hdr.cert is not None
        cert = self.verifier.verify(hdr.cert)
        if cert.agent != hdr.from_agent or cert.instance != hdr.from_instance:
            raise Unauthenticated("sender does not match its certificate")
        self.governance.rate_peek(cert.agent, hdr.name or "")
        key = self._pair.get(cert.box_pk)
        plaintext = open_frame(key, msg.data, end)
        self._replay.record(hdr.id, hdr.ts)
        return Peer(cert.agent, cert.instance, cert.roles, cert.serial, cert), key, plaintext

    async def _serve(
        self,
        spec: EndpointSpec,
        hdr: Header,
        peer: Peer,
        key: bytes,
        plaintext: bytes,
        reply: str,
        subject: str,
        request_bytes: int,
    ) -> None:
        ik = hdr.idempotency_key
        cache_key = (peer.agent, spec.name, ik) if ik is not None else None
        stats = self.endpoint_stats[spec.name]
        assert hdr.deadline is not None
        deadline = hdr.deadline / 1000
        cached: asyncio.Future[tuple[str, bytes]] | None = None
        if cache_key is not None:
            try:
                owner, cached = self._replies.claim(cache_key, hashlib.blake2b(plaintext).digest())
            except MeshError as exc:
                await self._send_reply(reply, hdr, key, exc.code, _error_body(exc))
                return
            if not owner:
                try:
                    status, payload = await asyncio.wait_for(
                        asyncio.shield(cached), max(0.0, deadline - time.time())
                    )
                except TimeoutError:
                    return  # the caller's deadline passed; it no longer waits
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    return  # the first attempt was abandoned; the caller will retry
                stats.replayed_from_cache += 1
                await self._send_reply(reply, hdr, key, status, payload)
                return
        started = time.perf_counter_ns()
        ran = False
        limit = self._limits[spec.name]
        edge: EdgeKey = (peer.agent, self.name, spec.name, "server")
        self.signals.enter(edge)
        span, traceparent, tracestate = self.telemetry.start_server(
            self.name, spec.name, subject, hdr.id, peer.agent, hdr.traceparent, hdr.tracestate
        )
        try:
            if not limit.try_acquire():
                try:
                    await asyncio.wait_for(limit.acquire(), max(0.0, deadline - time.time()))
                except TimeoutError:
                    raise DeadlineExceeded("deadline passed while the request was queued") from None
            try:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise DeadlineExceeded("deadline passed while the request was queued")
                try:
                    body = spec.input_type.model_validate_json(plaintext)
                except ValidationError as exc:
                    raise InvalidArgument(
                        f"request does not match {spec.input_type.__name__}: "
                        + "; ".join(
                            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
                        )
                    ) from None
                ran = True
                ctx = Context(
                    mesh=self,
                    caller=peer,
                    endpoint=spec.name,
                    deadline=deadline,
                    attempt=hdr.attempt or 1,
                    idempotency_key=ik,
                    traceparent=traceparent,
                    tracestate=tracestate,
                )
                async with asyncio.timeout(remaining):
                    if spec.wants_context:
                        result = await spec.handler(body, ctx)
                    else:
                        result = await spec.handler(body)
            finally:
                limit.release()
            status = OK
            payload = (
                result.__pydantic_serializer__.to_json(result)
                if isinstance(result, BaseModel)
                else b"null"
            )
        except MeshError as exc:
            status, payload = exc.code, _error_body(exc)
        except TimeoutError:
            exc2 = DeadlineExceeded(f"{spec.name} did not finish before the deadline")
            status, payload = exc2.code, _error_body(exc2)
        except asyncio.CancelledError:
            if cache_key is not None and cached is not None:
                self._replies.forget(cache_key)
                cached.cancel()
            gone = Unavailable(f"{self.name} shut down before {spec.name} finished")
            self.signals.finish(edge, gone.code, (time.perf_counter_ns() - started) / 1e9)
            self.telemetry.end(span, gone.code)
            with contextlib.suppress(Exception):
                await self._send_reply(reply, hdr, key, gone.code, _error_body(gone))
            raise
        except Exception as exc:  # a handler bug: the caller gets a safe message only
            # An exception's text may quote the payload: only its type by default, the
            # traceback at debug level.
            log.error(
                "mesh.handler_failed",
                endpoint=spec.name,
                caller=peer.agent,
                error_type=type(exc).__name__,
            )
            log.debug("mesh.handler_traceback", endpoint=spec.name, exc_info=True)
            status, payload = (
                Internal.code,
                json.dumps({"message": f"handler {spec.name} failed"}).encode(),
            )
        elapsed = time.perf_counter_ns() - started
        stats.requests += 1
        stats.processing_ns += elapsed
        if status != OK:
            stats.errors += 1
            stats.last_error = status
        self.signals.finish(edge, status, elapsed / 1e9)
        self.telemetry.end(span, status)
        if self.telemetry.access_log or self.governance.access_log(spec.name):
            self.telemetry.log_access(
                caller=peer.agent,
                caller_instance=peer.instance,
                endpoint=spec.name,
                code=status,
                seconds=elapsed / 1e9,
                request_bytes=request_bytes,
                reply_bytes=len(payload),
                traceparent=hdr.traceparent,
                attempt=hdr.attempt or 1,
            )
        if cache_key is not None and cached is not None:
            if ran:
                cached.set_result((status, payload))
            else:
                self._replies.forget(cache_key)
                cached.cancel()
        await self._send_reply(reply, hdr, key, status, payload)

    async def _send_reply(
        self, reply: str, hdr: Header, key: bytes, status: str, payload: bytes
    ) -> None:
        if len(payload) > self._max_body:
            exc = MessageTooLarge(f"reply of {len(payload)} bytes exceeds the limit")
            status, payload = exc.code, _error_body(exc)
        rh: dict[str, Any] = {
            "k": Kind.REPLY.value,
            "id": os.urandom(16),
            "ts": int(time.time() * 1000),
            "fa": self.name,
            "fi": self.instance,
            "ta": hdr.from_agent,
            "ti": hdr.from_instance,
            "re": hdr.id,
            "st": status,
            "sq": 0,
            "end": True,
        }
        hb = msgpack.packb(rh, use_bin_type=True)
        aad = PREFIX.pack(MAGIC, len(hb)) + hb
        with contextlib.suppress(MeshError):
            await self.transport.publish(reply, seal_frame(key, aad, payload))

    def _event_handler(self, specs: list[EventSpec]) -> Callable[[InboundMessage], Any]:
        replay = ReplayGuard(self.config.timeouts.replay_window)

        async def on_event(msg: InboundMessage) -> None:
            data = msg.data
            if len(data) > self._max_frame:
                self.stats.refuse(MessageTooLarge.code)
                return
            try:
                hdr, end = decode_frame(data)
                if len(data) - end > self._max_body + SIG_LEN:
                    raise _too_large(len(data) - end)
                if hdr.kind != Kind.EVENT:
                    raise DecodeError("expected an event frame")
                if msg.subject != f"{self.config.prefix}.evt.{hdr.from_agent}.{hdr.name}":
                    raise Unauthenticated("event subject does not match its signed header")
                replay.check(hdr.id, hdr.ts)
                readable = msg.headers or {}
                if (
                    readable.get(HDR_TRACEPARENT) != hdr.traceparent
                    or readable.get(HDR_TRACESTATE) != hdr.tracestate
                ):
                    raise Unauthenticated("readable trace headers differ from the signed ones")
                assert hdr.cert is not None
                cert = self.verifier.verify(hdr.cert)
                if cert.agent != hdr.from_agent or cert.instance != hdr.from_instance:
                    raise Unauthenticated("sender does not match its certificate")
                signed = verify_frame(cert.sign_pk, data)
                replay.record(hdr.id, hdr.ts)
            except MeshError as exc:
                self.stats.refuse(exc.code)
                return
            peer = Peer(cert.agent, cert.instance, cert.roles, cert.serial)
            for spec in specs:
                try:
                    event = spec.event_type.model_validate_json(signed[end:])
                except ValidationError:
                    self.stats.refuse(InvalidArgument.code)
                    continue
                ctx = Context(
                    mesh=self,
                    caller=peer,
                    endpoint=spec.topic,
                    traceparent=hdr.traceparent,
                    tracestate=hdr.tracestate,
                )
                task = asyncio.create_task(self._run_event(spec, event, ctx))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        return on_event

    async def _run_event(self, spec: EventSpec, event: BaseModel, ctx: Context) -> None:
        try:
            if spec.wants_context:
                await spec.handler(event, ctx)
            else:
                await spec.handler(event)
        except Exception as exc:
            log.error(
                "mesh.event_handler_failed",
                topic=spec.topic,
                sender=ctx.caller.agent,
                error_type=type(exc).__name__,
            )
            log.debug("mesh.event_handler_traceback", topic=spec.topic, exc_info=True)


async def _retry_unavailable(op: Callable[[], Awaitable[T]], deadline: float) -> T:
    """Run ``op`` until it succeeds, retrying ``Unavailable`` (a JetStream leader election,
    a reconnect) until ``deadline`` (monotonic seconds)."""
    while True:
        try:
            return await op()
        except Unavailable:
            if time.monotonic() + 0.25 >= deadline:
                raise
            await asyncio.sleep(0.25)


def _expire(fut: asyncio.Future[bytes], by_deadline: bool) -> None:
    if not fut.done():
        fut.set_exception(
            DeadlineExceeded("no reply before the deadline")
            if by_deadline
            else Unavailable("attempt timed out (per-try timeout)")
        )


@contextlib.asynccontextmanager
async def connect(
    identity: Identity,
    config: MeshConfig | None = None,
    *,
    agent: Agent | None = None,
    transport: Transport | None = None,
) -> AsyncIterator[Mesh]:
    """Join the mesh for the duration of an ``async with`` block.

    Example::

        async with mesh.connect(identity, MeshConfig(servers=(url,))) as m:
            answer = await m.request("researcher", "answer", Question(text="?"), Answer)
    """
    m = Mesh(identity, config, agent=agent, transport=transport)
    await m.start()
    try:
        yield m
    finally:
        await m.drain()
