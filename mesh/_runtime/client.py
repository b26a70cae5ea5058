"""The client pipeline: one call from a caller's ``request`` to its reply, as named stages.

A ``Call`` carries everything one call needs; the stages run in this order::

    prepare    names, trace context, idempotency key          (cheap checks, before anything)
    route      policy, once: the caller's own authorization, timeout and retries (Route), and
               the traffic route the call's metadata selects (``spec.routes``)
    deadline   the earlier of the caller's timeout and an inherited deadline
    ---------- per call: signals and the CLIENT span open here
    fault      delay or abort a share of a route's calls             (only if policy has faults)
    mirror     copy a share of a route's calls to a shadow           (only if policy mirrors)
    retry      attempts until a reply, a final error or the deadline, within the retry budget
    ---------- per attempt
    circuit    the destination's circuit breaker and limits          (only if policy has one)
    observe    the attempt's outcome and latency, per instance       (outlier detection, EWMA)
    pick       one live instance serving the endpoint: the route's split backend, ejected
               instances left out, affinity, then the balancer (power of two choices on
               outstanding requests, or peak EWMA); or the pinned one
    transmit   encode the header, seal, send to the instance's subject, await the sealed reply
               on the inbox (``mesh._runtime.replies`` opens it); on "no responders", send the
               same frame to the same instance again until the signed directory says it is gone;
               when the connection to NATS was lost meanwhile, a call safe to retry makes a
               fresh attempt and any other sends its frame again (the callee drops a copy)

``attempt_stages`` are ``async (next, call)`` and call ``next(call)`` to go on, so a stage acts
before and after the rest of the chain; the chain ends in ``attempt`` (``pick`` then
``transmit``). The traffic-management stages are ``mesh._runtime.traffic``'s. The chain is
composed again only when a new policy is installed: a stage no rule uses is not in it and costs
nothing per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from mesh._core.config import MeshConfig
from mesh._core.crypto import PairKeys, seal_frame
from mesh._core.delegation import Delegate, Delegation, encode_chain, extend, start
from mesh._core.envelope import (
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    MAX_CREDIT,
    OP_CANCEL,
    OP_CREDIT,
    check_metadata,
    check_trace_context,
    control_header,
    request_header,
)
from mesh._core.identity import Identity
from mesh._core.names import rpc_subject, validate_name
from mesh._core.policy import PolicyEngine, Route, Subset, TrafficRoute
from mesh._core.records import InstanceRecord
from mesh._core.resilience import Backoff, LeastLoadedPicker, RetryBudget
from mesh._core.signals import EdgeKey, EdgeStats
from mesh._runtime.directory import Directory
from mesh._runtime.governance import Governance
from mesh._runtime.ports import MeshStats, Observer, Span
from mesh._runtime.replies import LOST, Inbox, InstanceDown, NotDelivered, Pending
from mesh._runtime.streams import Progress, StreamState
from mesh._runtime.traffic import Destination, Traffic
from mesh._transport.base import Transport
from mesh.errors import (
    CircuitOpen,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    MessageTooLarge,
    NotFound,
    ResourceExhausted,
    StreamBroken,
    Unavailable,
)

__all__ = ["MAX_IDEMPOTENCY_KEY", "Call", "ClientPipeline"]

OK = "OK"
DENIED = "denied"
MAX_IDEMPOTENCY_KEY = 256

Next = Callable[["Call"], Awaitable[bytes]]
AttemptStage = Callable[[Next, "Call"], Awaitable[bytes]]
"""``async (next, call)``: the rest of the chain first, as in FastStream's middlewares, so that a
stage binds to its ``next`` once (``functools.partial``) when the chain is composed."""


@dataclass(slots=True)
class Call:
    """One call as it travels through the client stages.

    Attributes:
        agent / endpoint: what is called.
        body: the encoded request body.
        deadline: absolute, unix seconds.
        route: what policy says about this call.
        idempotency_key: the caller's key, if any.
        traceparent / tracestate: the trace context sent (the CLIENT span's, once opened).
        span: the observer's span.
        attempts / per_try: the retry settings in force.
        attempt: the number of the current attempt (1 for the first).
        record: the instance of the current attempt; ``idempotent`` its endpoint's flag.
        pinned: the instance a keyed call stays on; ``avoid`` instances not to pick again.
        fate: how the call ended (``ok``, ``ok_after_retry``, ``retries_exhausted``, ...).
        metadata: the request metadata the caller set.
        traffic: the policy route the call matched (``spec.routes``), if any.
        dest: the destination's circuit and ejections, when its settings have any.
        backend: the index of the split backend chosen for the call.
        subset: the instances a mirror copy may go to.
        mirror: the call is a mirror's copy.
        stream: the chunks of a streamed call (``Mesh.stream``).
        on_progress / idle: the caller's progress hook and inactivity timeout.
        chain / delegate: the delegation chain the call extends, and how it narrows it (or
            starts one: ``delegate`` without ``chain``).
    """

    agent: str
    endpoint: str
    body: bytes
    deadline: float
    route: Route
    idempotency_key: str | None
    traceparent: str | None
    tracestate: str | None
    attempts: int
    per_try: float | None
    span: Span = None
    attempt: int = 0
    record: InstanceRecord | None = None
    idempotent: bool = False
    pinned: InstanceRecord | None = None
    avoid: set[str] | None = None
    fate: str | None = None
    metadata: dict[str, str] | None = None
    traffic: TrafficRoute | None = None
    dest: Destination | None = None
    backend: int | None = None
    subset: Subset | None = None
    mirror: bool = False
    stream: StreamState | None = None
    on_progress: Callable[[Progress], None] | None = None
    idle: float | None = None
    chain: Delegation | None = None
    delegate: Delegate | None = None
    delegated: bool = False


def compose(stages: Sequence[AttemptStage], last: Next) -> Next:
    """Chain attempt stages so that each one's ``next`` is the one after it."""
    handler = last
    for stage in reversed(stages):
        handler = functools.partial(stage, handler)
    return handler


class ClientPipeline:
    """The caller's side of request/reply for one mesh connection.

    Args:
        name / instance: this instance.
        cert_raw: this instance's certificate bytes (updated on renewal).
        config: timeouts, retry policy and limits.
        governance: the policy in force (routes).
        inbox: where replies arrive.
        pair: the pair-key cache.
        transport: the broker connection.
        observer / signals / stats: where calls are reported.
    """

    def __init__(
        self,
        *,
        name: str,
        instance: str,
        cert_raw: bytes,
        config: MeshConfig,
        governance: Governance,
        inbox: Inbox,
        pair: PairKeys,
        transport: Transport,
        observer: Observer,
        signals: EdgeStats,
        stats: MeshStats,
    ) -> None:
        self.name = name
        self.instance = instance
        self.cert_raw = cert_raw
        self._config = config
        self._governance = governance
        self.directory: Directory | None = None
        """The live view of instances, set when the mesh has started."""
        self._inbox = inbox
        self._pair = pair
        self._transport = transport
        self._observer = observer
        self._signals = signals
        self._stats = stats
        retry = config.retry
        self._backoff = Backoff(retry.backoff_base, retry.backoff_cap)
        self._resend_base, self._resend_cap = retry.backoff_base, retry.backoff_cap
        self._suspect_for = config.directory.ttl * 2
        self._suspects: dict[str, float] = {}  # instances penalized after "no responders": since
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_s, retry.budget_ttl)
        self.picker: LeastLoadedPicker[str] = LeastLoadedPicker()
        self._max_body = config.limits.max_body
        self._checked_names: set[tuple[str, str]] = set()
        self._rpc_subject = functools.partial(rpc_subject, config.prefix)
        self.traffic = Traffic(self)
        self._engine: PolicyEngine | None = None
        self._destinations = False  # whether any endpoint setting has a circuit or ejections
        self._balancers = False  # whether any endpoint setting asks for peak EWMA
        self.attempt_stages: tuple[AttemptStage, ...] = (self.retry,)
        self._run = compose(self.attempt_stages, self.attempt)
        self._controls: set[asyncio.Task[None]] = set()  # cancel and credit frames being sent
        self.identity: Identity | None = None
        """This instance's keys and certificate (set by the mesh, replaced on renewal): what
        signs delegation links."""
        self._delegate_all = config.delegation

    def _configure(self, engine: PolicyEngine) -> None:
        """Compose the chain for a newly installed policy: only the stages it uses."""
        self._engine = engine
        features = engine.features
        per_call, per_attempt = self.traffic.stages(features)
        self._destinations = bool(features & {"circuit_breaker", "outlier_detection"})
        self._balancers = "peak_ewma" in features
        self.attempt_stages = (*per_call, self.retry, *per_attempt)
        self._run = compose(self.attempt_stages, self.attempt)

    async def call(
        self,
        agent: str,
        endpoint: str,
        body: bytes,
        *,
        timeout: float | None,
        deadline: float | None,
        idempotency_key: str | None,
        traceparent: str | None,
        tracestate: str | None,
        metadata: Mapping[str, str] | None = None,
        stream: StreamState | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        idle_timeout: float | None = None,
        chain: Delegation | None = None,
        delegate: Delegate | None = None,
    ) -> bytes:
        """Run one call through the stages; returns the reply body (``b""`` for a stream,
        once it opened: its chunks go to ``stream``).

        Raises:
            MeshError: the subclass matching the failure.
        """
        self.prepare(agent, endpoint, idempotency_key, traceparent, tracestate)
        if stream is not None or idle_timeout is not None:
            _check_stream(stream, idempotency_key, idle_timeout)
        md: dict[str, str] | None = None
        if metadata:
            md = dict(metadata)
            check_metadata(md)
        try:
            route = self.route(
                agent, endpoint, seen_chain(self.name, chain, delegate, self._delegate_all)
            )
        except MeshError as exc:
            self._refused(agent, endpoint, exc, traceparent, tracestate)
            raise
        engine = self._governance.engine
        if engine is not self._engine:
            self._configure(engine)
        traffic = route.select(md) if route.traffic else None
        dl = self.deadline(agent, endpoint, route, timeout, deadline, traffic)
        if len(body) > self._max_body:
            raise MessageTooLarge(
                f"request body is {len(body)} bytes, the limit is {self._max_body}"
            )
        attempts, per_try = self._config.retry.attempts, self._config.retry.per_try_timeout
        retries = route.retries
        if traffic is not None and traffic.retries is not None:
            retries = traffic.retries
        if retries is not None:
            attempts = retries.attempts
            per_try = retries.per_try_timeout or per_try
        self.budget.record_request()
        edge: EdgeKey = (self.name, agent, endpoint, "client")
        self._signals.enter(edge)
        span, traceparent, tracestate = self._observer.start_client(
            agent, endpoint, traceparent, tracestate
        )
        c = Call(
            agent, endpoint, body, dl, route, idempotency_key, traceparent, tracestate,
            attempts, per_try, span,
        )  # fmt: skip
        if md is not None:
            c.metadata = md
        if stream is not None or on_progress is not None or idle_timeout is not None:
            c.stream, c.on_progress, c.idle = stream, on_progress, idle_timeout
        if chain is not None or delegate is not None or self._delegate_all:
            c.chain, c.delegate, c.delegated = chain, delegate, True
        if traffic is not None:
            c.traffic = traffic
        if self._destinations:
            c.dest = self.traffic.destination(route, agent)
        started = time.perf_counter()
        code = OK
        try:
            return await self._run(c)
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
            if stream is not None and stream.opened and code == OK:
                # Opened: the call lasts until the consumer is done with the stream.
                stream.finished = functools.partial(self._finished, edge, started, span, c)
            else:
                self._finished(edge, started, span, c, code)

    def _finished(self, edge: EdgeKey, started: float, span: Span, call: Call, code: str) -> None:
        self._signals.finish(edge, code, time.perf_counter() - started)
        self._observer.end(span, code, call.fate)

    def _refused(
        self,
        agent: str,
        endpoint: str,
        exc: MeshError,
        traceparent: str | None,
        tracestate: str | None,
    ) -> None:
        """A call this caller's own policy refused (``route``): counted as a call with its
        code in the client-side signals, with the fate ``denied``, and a CLIENT span with
        error status naming the rule, like a call the callee refused."""
        self._stats.fate(DENIED)
        self._signals.record(self.name, agent, endpoint, "client", exc.code, 0.0)
        span, _, _ = self._observer.start_client(agent, endpoint, traceparent, tracestate)
        self._observer.end(span, exc.code, DENIED, exc.rule)

    # --- stages before the first attempt -----------------------------------------------------

    def prepare(
        self,
        agent: str,
        endpoint: str,
        idempotency_key: str | None,
        traceparent: str | None,
        tracestate: str | None,
    ) -> None:
        """Names, trace context and idempotency key are well formed.

        Raises:
            InvalidArgument: naming what is wrong.
        """
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

    def route(
        self,
        agent: str,
        endpoint: str,
        chain: tuple[str, tuple[str, ...], int, tuple[str, ...]] | None = None,
    ) -> Route:
        """What policy says about this call, resolved once; the caller's own check fails fast.
        ``chain``: what the callee's rules will see of the call's delegation chain
        (``seen_chain``), so that rules on origins, paths and scopes decide here as there.

        Raises:
            PermissionDenied: naming the rule.
        """
        return self._governance.outgoing(agent, endpoint, chain)

    def deadline(
        self,
        agent: str,
        endpoint: str,
        route: Route,
        timeout: float | None,
        deadline: float | None,
        traffic: TrafficRoute | None = None,
    ) -> float:
        """The call's absolute deadline: the earlier of the timeout and an inherited deadline.
        The timeout is the caller's, else the traffic route's, else the endpoint's.

        Raises:
            DeadlineExceeded: it has already passed.
        """
        if timeout is None:
            if traffic is not None and traffic.timeout is not None:
                timeout = traffic.timeout
            else:
                timeout = route.timeout or self._config.timeouts.request
        now = time.time()
        dl = now + timeout if deadline is None else min(now + timeout, deadline)
        if dl <= now:
            self._stats.fate("deadline_exceeded")
            raise DeadlineExceeded(f"deadline already passed before calling {agent}.{endpoint}")
        return dl

    # --- attempt stages ----------------------------------------------------------------------

    async def retry(self, next: Next, call: Call) -> bytes:
        """Attempts until a reply, a final error or the deadline (``docs/protocol.md`` §17).

        Idempotent calls move to another instance; keyed calls stay on theirs and move only on
        signed evidence that it is gone.
        """
        while True:
            call.attempt += 1
            call.record = None
            call.idempotent = False
            try:
                if call.attempt > 1 and time.time() >= call.deadline:
                    raise DeadlineExceeded(f"deadline of {call.agent}.{call.endpoint} passed")
                payload = await next(call)
            except MeshError as exc:
                await self._after_failure(call, exc)
                continue
            call.fate = "ok" if call.attempt == 1 else "ok_after_retry"
            self._stats.fate(call.fate)
            return payload

    async def _after_failure(self, call: Call, exc: MeshError) -> None:
        """Wait before the next attempt, or re-raise ``exc`` when the call is over."""
        record, idempotent = call.record, call.idempotent
        may_retry = isinstance(exc, NotDelivered) or idempotent or call.idempotency_key is not None
        delay, fate = self._retry_delay(exc, may_retry, call.attempt, call.attempts, call.deadline)
        self._observer.retry(call.span, call.attempt, exc.code, fate, delay or 0.0)
        if delay is None:
            call.fate = fate
            self._stats.fate(fate)
            raise exc
        if record is not None and idempotent:
            if call.avoid is None:
                call.avoid = set()
            call.avoid.add(record.key)  # any instance will do: prefer another one
        elif record is not None:
            # A keyed call may still be running there (a per-try timeout, a sealed UNAVAILABLE
            # from a handler). Its reply cache answers a retry at once, so stay, and move only
            # on signed evidence that it is gone (``pick`` checks before every attempt).
            call.pinned = record
        if record is not None and isinstance(exc, ResourceExhausted) and exc.retry_after:
            self.picker.penalize(record.key, exc.retry_after)
            self.traffic.penalize(record.key, exc.retry_after)
        await asyncio.sleep(delay)

    def _retry_delay(
        self, exc: MeshError, may_retry: bool, attempt: int, attempts: int, dl: float
    ) -> tuple[float | None, str]:
        """Seconds to wait before retrying (``None`` to give up), and the call's fate."""
        if not exc.retryable or not may_retry:
            if isinstance(exc, CircuitOpen):
                return None, "circuit_open"
            return None, "deadline_exceeded" if isinstance(exc, DeadlineExceeded) else "failed"
        if attempt >= attempts:
            return None, "retries_exhausted"
        delay = self._backoff.delay(attempt)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        if time.time() + delay >= dl:
            return None, "deadline_exceeded"
        if not self.budget.try_spend():
            return None, "retry_skipped_budget"
        return delay, "retried"

    def pick(self, call: Call) -> InstanceRecord:
        """One live instance that serves the endpoint; a keyed call's pinned one while it lives.

        Raises:
            NotDelivered: no live instance.
            NotFound: the instance does not serve the endpoint.
            FailedPrecondition: the endpoint's schema is pinned (``MeshConfig.schema_pins``)
                and the instance's record announces another hash.
        """
        directory = self.directory
        assert directory is not None
        pinned = call.pinned
        if pinned is not None and directory.is_gone(pinned.key):
            if call.avoid is None:
                call.avoid = set()
            call.avoid.add(pinned.key)
            pinned = call.pinned = None
        record = pinned or self._choose(directory, call)
        call.record = record
        info = record.endpoints.get(call.endpoint)
        if info is None:
            raise NotFound(f"agent {call.agent!r} has no endpoint {call.endpoint!r}")
        pins = self._config.schema_pins
        if pins and (pin := pins.get(f"{call.agent}.{call.endpoint}")) and info.schema != pin:
            # The record is signed by the instance: what it announces is what it serves.
            announced = info.schema or "no schema hash (it does not publish its schemas)"
            raise FailedPrecondition(
                f"{call.agent}.{call.endpoint} is pinned to schema {pin}, but instance "
                f"{record.key} announces {announced}: not calling it. Check the new schemas "
                f"(mesh-policy schemas {call.agent}), then re-pin "
                f"(MeshConfig.schema_pins, or mesh-agent run --pin "
                f"{call.agent}.{call.endpoint}={info.schema or 'HASH'})"
            )
        if info.streams != (call.stream is not None):
            what = f"{call.agent}.{call.endpoint}"
            raise InvalidArgument(
                f"{what} streams its reply: call it with stream()"
                if info.streams
                else f"{what} does not stream: call it with request()"
            )
        call.idempotent = info.idempotent
        return record

    def _choose(self, directory: Directory, call: Call) -> InstanceRecord:
        agent, endpoint, avoid = call.agent, call.endpoint, call.avoid
        candidates = directory.instances(agent)
        if not candidates:
            raise NotDelivered(f"no live instance of agent {agent!r}")
        if len(candidates) > 1 and any(endpoint not in r.endpoints for r in candidates):
            # During a rolling upgrade some instances may not serve the endpoint yet.
            candidates = [r for r in candidates if endpoint in r.endpoints] or candidates
        if (
            call.traffic is not None
            or call.dest is not None
            or call.subset is not None
            or self._balancers
        ):
            return self.traffic.choose(call, candidates)
        if avoid:
            candidates = [r for r in candidates if r.key not in avoid] or candidates
        return self.picker.pick(candidates, _record_key)

    async def attempt(self, call: Call) -> bytes:
        """One attempt: ``pick`` an instance, then ``transmit``: seal the request to it, send
        it, and await its reply."""
        directory = self.directory
        if directory is not None and not directory.loaded(call.agent):
            # The first call to an agent opens its watch: wait for its records, at most
            # until the deadline (if they do not come, ``pick`` finds no instance).
            with contextlib.suppress(Unavailable):
                await directory.watch_agent(call.agent, max(0.0, call.deadline - time.time()))
        record = self.pick(call)
        rid = os.urandom(16)
        dl_ms = int(call.deadline * 1000)
        traceparent, tracestate = call.traceparent, call.tracestate
        stream = call.stream
        body = call.body
        chain_len = None
        if call.delegated:
            chain = self._chain(call, record, rid, dl_ms)
            chain_len = len(chain)
            body = chain + body
            if len(body) > self._max_body:
                raise MessageTooLarge(
                    f"request body and delegation chain are {len(body)} bytes, the limit is "
                    f"{self._max_body}"
                )
        aad = request_header(
            rid, int(time.time() * 1000), self.name, self.instance, record.agent,
            record.instance, call.endpoint, dl_ms, call.attempt, self.cert_raw,
            call.idempotency_key, traceparent, tracestate, call.metadata, call.mirror,
            None if stream is None else stream.window,
            call.on_progress is not None or call.idle is not None, chain_len,
        )  # fmt: skip
        headers = {HDR_DEADLINE: str(dl_ms)}
        if traceparent is not None:
            headers[HDR_TRACEPARENT] = traceparent
        if tracestate is not None:
            headers[HDR_TRACESTATE] = tracestate
        key = self._pair.get(record.certificate.box_pk)
        frame = seal_frame(key, aad, body)
        wait = call.deadline - time.time()
        per_try = call.per_try
        by_deadline = per_try is None or per_try >= wait
        if not by_deadline and per_try is not None:
            wait = per_try
        if stream is None and call.on_progress is None and call.idle is None:
            token, reply, pending = self._inbox.add(rid, record, key, wait, by_deadline)
        else:
            token, reply, pending = self._inbox.add(
                rid, record, key, wait, by_deadline,
                stream=stream, on_progress=call.on_progress, idle=call.idle,
            )  # fmt: skip
        kept = False
        picker_key = record.key
        self.picker.acquire(picker_key)
        ewma = self.traffic.ewma
        if ewma is not None:
            ewma.acquire(picker_key)
        subject = self._rpc_subject(record.agent, record.instance, call.endpoint)
        if call.span is not None:
            self._observer.attempt(call.span, call.attempt, subject, rid)
        try:
            await self._transport.publish(subject, frame, reply=reply, headers=headers)
            payload = None if pending.signalled else await pending.fut
            if payload is None:
                payload = await self._resend(call, token, pending, subject, frame, reply, headers)
            if stream is not None and stream.opened:
                kept = True  # the stream owns the token now, until its consumer closes it
                self._keep(stream, pending, token, subject, record, key, rid, call.deadline)
            return payload
        except (asyncio.CancelledError, StreamBroken):
            # The caller gave up (or cannot trust what follows): the callee's handler is
            # cancelled, and every call it made in turn.
            self._control(subject, record, key, rid, OP_CANCEL)
            raise
        finally:
            if not kept:
                self._inbox.remove(token)
            self.picker.release(picker_key)
            if ewma is not None:
                ewma.release(picker_key)

    def _chain(self, call: Call, record: InstanceRecord, rid: bytes, dl_ms: int) -> bytes:
        """The delegation chain of one attempt: the parent's links and a new one for this
        request (``rid``), signed by this instance; or a new chain's first link.

        Raises:
            DelegationRefused: the parent chain allows no such call (nothing is sent).
        """
        identity = self.identity
        assert identity is not None
        signing, cert = identity.keys.signing, identity.certificate
        parent = call.chain
        if parent is None:
            link = start(
                signing,
                cert,
                to=record.agent,
                endpoint=call.endpoint,
                req=rid,
                exp_ms=dl_ms,
                narrowing=call.delegate,
            )
            return encode_chain((link,))
        link = extend(
            signing, cert, parent, to=record.agent, endpoint=call.endpoint, req=rid,
            exp_ms=dl_ms, narrowing=call.delegate,
        )  # fmt: skip
        return encode_chain((*parent.links, link))

    def _keep(
        self,
        stream: StreamState,
        pending: Pending,
        token: str,
        subject: str,
        record: InstanceRecord,
        key: bytes,
        rid: bytes,
        deadline: float,
    ) -> None:
        """An opened stream: its chunks arrive until the end or the deadline; credit and a
        cancel go to the callee as the consumer reads or leaves."""
        self._inbox.keep_until(pending, deadline - time.time())
        stream.grant = functools.partial(self._control, subject, record, key, rid, OP_CREDIT)
        stream.cancel = functools.partial(self._control, subject, record, key, rid, OP_CANCEL)
        stream.release = functools.partial(self._inbox.remove, token)

    def _control(
        self,
        subject: str,
        record: InstanceRecord,
        key: bytes,
        rid: bytes,
        op: str,
        credit: int | None = None,
    ) -> None:
        """Send a sealed CONTROL frame about the call ``rid`` to its callee, in the background
        (a cancelled task must not wait for it). The callee acts on it only if it opens under
        the pair key of the call; copies do nothing more (``docs/protocol.md`` section 21)."""
        aad = control_header(
            os.urandom(16), int(time.time() * 1000), self.name, self.instance, record.agent,
            record.instance, rid, op, credit,
        )  # fmt: skip
        task = asyncio.ensure_future(self._send_control(subject, seal_frame(key, aad, b"")))
        self._controls.add(task)
        task.add_done_callback(self._controls.discard)

    async def _send_control(self, subject: str, frame: bytes) -> None:
        with contextlib.suppress(MeshError):
            await self._transport.publish(subject, frame)

    def fate(self, call: Call, fate: str) -> None:
        """End ``call`` with ``fate`` (counted), from a stage outside the retry stage."""
        call.fate = fate
        self._stats.fate(fate)

    def traffic_event(
        self, call: Call, event: str, *, access: dict[str, str] | None = None, **attrs: str
    ) -> None:
        """Tell the observer of a traffic-management event of ``call``. ``access``: the marks
        of a caller-side access-log line (``fault`` and ``rule``, or ``circuit`` and
        ``destination``), written when the access log is on, with ``attrs``' ``code``."""
        line = None
        if access is not None and (self._observer.access_log or call.route.access_log):
            line = {
                "callee": call.agent,
                "endpoint": call.endpoint,
                "code": attrs.get("code"),
                "traceparent": call.traceparent,
                **access,
            }
        self._observer.traffic(call.span, event, attrs, line)

    def heard(self, key: str, ts: float) -> None:
        """Fresh signed evidence of life from an instance (a record or beat the directory
        accepted): a "no responders" penalty older than its signature is lifted, so an instance
        that was merely resubscribing (a broker restart) takes calls again at once."""
        since = self._suspects.get(key)
        if since is not None and ts > since:
            del self._suspects[key]
            self.picker.penalize(key, 0.0)
            self.traffic.penalize(key, 0.0)

    def _suspect(self, key: str) -> None:
        self._suspects[key] = time.time()
        self.picker.penalize(key, self._suspect_for)
        self.traffic.penalize(key, self._suspect_for)
        if len(self._suspects) > 1024:  # forget the oldest: a penalty only steers new calls
            del self._suspects[next(iter(self._suspects))]

    async def _resend(
        self,
        call: Call,
        token: str,
        pending: Pending,
        subject: str,
        frame: bytes,
        reply: str,
        headers: dict[str, str],
    ) -> bytes:
        """After "no responders", or a lost connection: the same frame to the same instance,
        until a reply, the attempt's timer, or signed evidence that the instance is gone.

        The status is unauthenticated and the request may have been delivered, so the attempt
        neither fails nor moves on it. The same frame (same id) is safe to send again: the
        callee's seen-cache refuses a copy it already has. New calls prefer other instances
        for twice the directory ttl meanwhile (a penalty, never an exclusion), until a signed
        record or beat newer than the status arrives.

        When this connection dropped while the attempt waited (``LOST``), the request or its
        reply may be gone; a call that may be retried (idempotent, or keyed) fails the attempt
        with ``Unavailable`` so that the retry stage sends a fresh one (a keyed call stays on
        its instance, whose reply cache answers a duplicate); any other call sends its frame
        again. When the instance's beat says it reconnected (``MOVED``), the frame is sent
        again at once.

        Raises:
            InstanceDown: the directory says the instance is gone (draining, or no signed
                heartbeat for ``ttl``): the request never ran there if the status was genuine.
            Unavailable: the connection was lost while a retryable call waited.
            MeshError: the attempt's timer fired (with the hints received) or the reply's error.
        """
        record = pending.record
        directory = self.directory
        assert directory is not None
        woken = self._inbox.woken
        suspected = False
        delay = self._resend_base
        while True:
            fut = pending.fut
            if pending.signalled and not fut.done():
                reason = woken.pop(token, None)
                if reason == LOST and (call.idempotent or call.idempotency_key is not None):
                    raise Unavailable(
                        f"the connection to NATS was lost while waiting for {record.key}"
                    )
                if reason is None:  # "no responders"
                    if not suspected:
                        self._suspect(record.key)
                        suspected = True
                    if not directory.is_gone(record.key):  # gone: a drain, fail over at once
                        await asyncio.wait((fut,), timeout=delay)
                        delay = min(delay * 2, self._resend_cap)
                if not fut.done():
                    if directory.is_gone(record.key):
                        raise InstanceDown(
                            f"no responders at instance {record.key}, which has left the directory"
                        )
                    pending.signalled = False
                    await self._transport.publish(subject, frame, reply=reply, headers=headers)
                    continue  # a status may have arrived while sending
            payload = await fut
            if payload is not None:
                return payload


def _record_key(record: InstanceRecord) -> str:
    return record.key


def seen_chain(
    me: str, chain: Delegation | None, delegate: Delegate | None, delegate_all: bool
) -> tuple[str, tuple[str, ...], int, tuple[str, ...]] | None:
    """What the callee's policy will see of a call's delegation chain (origin, path, depth,
    scopes: ``mesh._core.policy.Chain``), or ``None`` for a direct call: the chain carried on
    with this caller added to its path, or a chain this caller starts (as the origin, or for
    the external principal a gateway names). Scopes narrowed by ``delegate`` are those sent."""
    if chain is not None:
        scopes = chain.scopes if delegate is None or delegate.scopes is None else delegate.scopes
        return chain.origin, (*chain.path, me), chain.depth + 1, tuple(scopes)
    if delegate is None and not delegate_all:
        return None
    origin = delegate.origin if delegate is not None and delegate.origin else me
    scopes = delegate.scopes if delegate is not None and delegate.scopes else ()
    return origin, (me,), 1, tuple(scopes)


def _check_stream(
    stream: StreamState | None, idempotency_key: str | None, idle_timeout: float | None
) -> None:
    """A stream's credit is 1 to ``MAX_CREDIT``, it carries no idempotency key (its chunks
    are not kept to answer a retry), and an idle timeout is positive.

    Raises:
        InvalidArgument: naming what is wrong.
    """
    if stream is not None:
        if not 1 <= stream.window <= MAX_CREDIT:
            raise InvalidArgument(f"stream credit must be 1 to {MAX_CREDIT}, not {stream.window}")
        if idempotency_key is not None:
            raise InvalidArgument(
                "streams take no idempotency key: their chunks are not kept to answer a retry"
            )
    if idle_timeout is not None and not idle_timeout > 0:
        raise InvalidArgument(f"idle_timeout must be positive seconds, not {idle_timeout!r}")
