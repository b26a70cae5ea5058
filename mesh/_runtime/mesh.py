"""``MeshRuntime``: one agent instance's connection to the mesh, wiring the runtime's parts.

It owns the lifecycle (start, reconnect, drain) and hands each part what it needs:

- ``client.ClientPipeline``: the caller's stages (route, deadline, retry, pick, transmit);
- ``replies.Inbox``: attempts waiting for their sealed replies;
- ``server.ServerPipeline``: the callee's stages (decode, admit, endpoint, authorize, dedupe,
  queue, run, reply);
- ``events``: signed events out and in;
- ``directory.Directory`` and ``registration.Registration``: the verified view of instances
  and this instance's own record;
- ``governance.Governance``: policy, revocations, renewal, denial reports;
- an ``Observer`` (spans, metrics, access log) and a ``Transport``, both given to it.

The public ``mesh.Mesh`` is this class with the defaults filled in (nats-py, OpenTelemetry).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mesh._core.config import MeshConfig
from mesh._core.crypto import NONCE_LEN, TAG_LEN, PairKeys
from mesh._core.delegation import Delegate, Delegation
from mesh._core.envelope import MAX_CREDIT
from mesh._core.head import Head
from mesh._core.identity import Certificate, CertificateVerifier, Identity, TrustRoot
from mesh._core.names import (
    beat_subject,
    directory_bucket,
    event_subject,
    rpc_listen_subject,
    validate_name,
)
from mesh._core.records import STATE_DRAINING
from mesh._core.schemas import EndpointSchema
from mesh._core.signals import SIGNALS_TOPIC, EdgeStats
from mesh._log import get_logger
from mesh._runtime.agent import Agent, EventSpec
from mesh._runtime.client import ClientPipeline
from mesh._runtime.concurrency import cancel_and_wait
from mesh._runtime.control import ControlStore
from mesh._runtime.directory import Directory, DirectoryBucket
from mesh._runtime.events import EventPublisher, EventReceiver
from mesh._runtime.governance import Governance
from mesh._runtime.ports import EndpointStats, MeshStats, NoObserver, Observer
from mesh._runtime.registration import Registration
from mesh._runtime.replies import Inbox
from mesh._runtime.schemas import fetch_schemas
from mesh._runtime.server import ServerPipeline
from mesh._runtime.services import serve_services
from mesh._runtime.streams import (
    DEFAULT_CREDIT,
    Progress,
    Stream,
    StreamState,
    json_chunk,
    model_chunk,
)
from mesh._runtime.traffic import Traffic
from mesh._transport.base import InboundMessage, Subscription, Transport
from mesh.errors import FailedPrecondition, InvalidArgument, MeshError, Unavailable

__all__ = ["MeshRuntime"]

log = get_logger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class MeshRuntime:
    """A connection to the mesh as one agent instance (see ``mesh.Mesh`` for the arguments).

    Args:
        identity: this instance's keys and certificate.
        config: servers, prefix, timeouts, retry policy, limits.
        agent: the agent definition to serve (``None`` for a caller-only client).
        transport: the broker connection.
        observer: where spans, metrics and access-log lines go (default: nowhere).
        trust_root: the trust root with its private key, for the registry.
    """

    def __init__(
        self,
        identity: Identity,
        config: MeshConfig,
        *,
        transport: Transport,
        agent: Agent | None = None,
        observer: Observer | None = None,
        trust_root: TrustRoot | None = None,
    ) -> None:
        if agent is not None and agent.name != identity.agent:
            raise InvalidArgument(
                f"identity is for agent {identity.agent!r}, cannot serve agent {agent.name!r}"
            )
        if trust_root is not None and trust_root.public_key != identity.root_public_key:
            raise InvalidArgument("trust_root is not the root that issued this identity")
        self.identity = identity
        self._config = config
        self.agent = agent
        self.transport = transport
        self.observer: Observer = observer or NoObserver()
        self.trust_root = trust_root or TrustRoot.from_public(identity.root_public_key)
        self.name = identity.agent
        self.instance = identity.instance
        self.control = ControlStore(
            transport, config.prefix, self.trust_root, replicas=config.replicas
        )
        self.verifier = CertificateVerifier(identity.root_public_key)
        self.governance = Governance(
            self,
            policy_changed=self.policy_changed,
            replace_certificate=self.replace_certificate,
            own_revoked=self._own_certificate_revoked,
        )
        self.signals = EdgeStats(identity.agent, identity.instance)
        self.stats = MeshStats()
        self.certificate_listeners: list[Callable[[Identity], None]] = []
        self.started_at = 0.0
        pair = PairKeys(identity.keys.box, config.prefix)
        self._inbox = Inbox(
            identity.instance,
            config.limits.max_body + NONCE_LEN + TAG_LEN,
            self.stats,
        )
        self.client = ClientPipeline(
            name=self.name,
            instance=self.instance,
            cert_raw=identity.certificate.raw,
            config=config,
            governance=self.governance,
            inbox=self._inbox,
            pair=pair,
            transport=transport,
            observer=self.observer,
            signals=self.signals,
            stats=self.stats,
        )
        self.client.identity = identity
        self._events = EventPublisher(lambda: self.identity, config, transport)
        self.server: ServerPipeline | None = None
        self._registration: Registration | None = None
        if agent is not None:
            self.server = ServerPipeline(
                mesh=self,
                agent=agent,
                config=config,
                governance=self.governance,
                verifier=self.verifier,
                pair=pair,
                transport=transport,
                observer=self.observer,
                signals=self.signals,
                stats=self.stats,
                spawn=self.spawn,
            )
            self._registration = Registration(
                agent, lambda: self.identity, self.governance, config.directory.heartbeat
            )
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._directory: Directory | None = None
        self._state = "new"
        self._closed = asyncio.Event()
        self._revoked_drain: asyncio.Task[None] | None = None
        self.bucket = directory_bucket(config.prefix)

    # --- what others read --------------------------------------------------------------------

    @property
    def config(self) -> MeshConfig:
        """The configuration this connection was made with (fixed for its life)."""
        return self._config

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def directory(self) -> Directory:
        """The verified live view of the directory (once started)."""
        if self._directory is None:
            raise FailedPrecondition("mesh is not started")
        return self._directory

    @property
    def endpoint_stats(self) -> dict[str, EndpointStats]:
        """Counters of each served endpoint (empty for a caller-only client)."""
        return self.server.endpoint_stats if self.server is not None else {}

    @property
    def traffic(self) -> Traffic:
        """The caller's traffic management: event counts, circuit states, ejected instances."""
        return self.client.traffic

    @property
    def decisions(self) -> Counter[tuple[str, str]]:
        """Authorization decisions taken as callee, by (result, rule)."""
        return self.governance.decisions

    @property
    def head(self) -> Head | None:
        """The newest signed control-plane head this instance accepted."""
        return self.governance.head

    @property
    def stale(self) -> str | None:
        """Why this instance may not run the mesh's current state (``None``: it does)."""
        return self.governance.stale

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> MeshRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def start(self) -> None:
        """Connect, load the directory, then (for an agent) subscribe and register.

        Raises:
            Unavailable: NATS or JetStream could not be reached.
            FailedPrecondition: the mesh was already started or closed; this agent's trust
                root is not the mesh's (the current policy does not verify with it); or this
                agent's certificate is revoked.
        """
        if self._state != "new":
            raise FailedPrecondition(f"mesh cannot start from state {self._state!r}")
        self._state = "starting"
        timeouts = self.config.timeouts
        await self.transport.connect()
        self._inbox.subject = self.transport.new_inbox()
        self._subs.append(
            await self.transport.subscribe(f"{self._inbox.subject}.*", self._inbox.on_reply)
        )
        ttl = self.config.directory.ttl
        deadline = time.monotonic() + timeouts.connect
        bucket = DirectoryBucket(
            self.transport, self.bucket, ttl=max(3 * ttl, 10.0),
            replicas=self.config.replicas,
        )  # fmt: skip
        await _retry_unavailable(bucket.open, deadline)
        self._directory = Directory(
            bucket.watch,
            self.verifier,
            ttl=ttl,
            on_dead=self._inbox.fail_instance,
            bucket=bucket,
            max_skew=timeouts.max_future,
            prefix=self.config.prefix,
            on_heard=self.client.heard,
            on_reconnected=self._inbox.instance_reconnected,
            listen=self.transport.subscribe,
        )
        await self._directory.start()
        self.client.directory = self._directory
        if self.config.directory.scope == "all":
            await self._directory.watch_all(max(0.1, deadline - time.monotonic()))
        try:
            await self.governance.start(self.control, max(0.1, deadline - time.monotonic()))
            serial = self.identity.certificate.serial
            if self.agent is not None and serial in self.verifier.revoked:
                raise FailedPrecondition(f"this instance's certificate {serial} is revoked")
        except FailedPrecondition:
            await self._abort_start()
            raise
        if self.agent is not None:
            assert self._registration is not None
            self._registration.bucket = bucket
            beats = beat_subject(self.config.prefix, self.name, self.instance)
            self._registration.send_beat = functools.partial(self.transport.publish, beats)
            self._registration.prefix = self.config.prefix
            await self._subscribe(self.agent)
            if self.config.services:
                await serve_services(self)
            # Every subscription in place at the server before the agent is announced; once
            # it is, nothing is awaited but the record's put (a runner signalled after a
            # caller saw the record drains the agent: it has started).
            await self.transport.flush(timeouts.connect)
            self._state = "ready"  # start hooks may call out before the agent is announced
            for hook in self.agent.startup:
                await hook(self)
            await _retry_unavailable(self._registration.register, deadline)
            self._heartbeat = asyncio.create_task(
                self._registration.heartbeat(lambda: self._state == "ready"),
                name="mesh-heartbeat",
            )
        self.transport.on_reconnect(self._reconnected)
        self.transport.on_disconnect(self._disconnected)
        if self.config.signals_interval > 0:
            self._reporter = asyncio.create_task(self._report_signals(), name="mesh-signals")
        self.observer.register_metrics(self)
        if self.agent is None:
            await self.transport.flush(timeouts.connect)  # the inbox in place before a call
        self.started_at = time.time()
        self._state = "ready"

    async def _abort_start(self) -> None:
        await self.governance.close()
        if self._directory is not None:
            await self._directory.close()
        with contextlib.suppress(Exception):
            await self.transport.close()
        self._state = "closed"
        self._closed.set()

    def _own_certificate_revoked(self) -> None:
        """An agent whose own certificate is revoked stops serving: it drains (announces
        ``draining``, stops taking requests, withdraws its record). The drain runs in a task of
        its own: it cancels the revocation watch that calls this."""
        if self.agent is None or self._state != "ready" or self._revoked_drain is not None:
            return
        log.warning("mesh.draining_revoked", agent=self.name, instance=self.instance)
        self._revoked_drain = asyncio.create_task(self.drain(), name="mesh-revoked-drain")

    async def _subscribe(self, agent: Agent) -> None:
        assert self.server is not None
        if agent.endpoints:
            subject = rpc_listen_subject(self.config.prefix, self.name, self.instance)
            self._subs.append(await self.transport.subscribe(subject, self.server.on_request))
        by_subject: dict[str, list[EventSpec]] = {}
        for ev in agent.events:
            by_subject.setdefault(event_subject(self.config.prefix, ev.agent, ev.topic), []).append(
                ev
            )
        for subject, specs in by_subject.items():
            receiver = EventReceiver(
                self, specs, self.config, self.verifier, self.stats, self.spawn
            )
            self._subs.append(await self.transport.subscribe(subject, receiver.on_event))

    async def _disconnected(self) -> None:
        """Nothing is heard until the reconnect: freeze the directory's liveness, and note
        the attempts in flight (their requests or replies may be lost)."""
        if self._directory is not None:
            self._directory.deaf()
        self._inbox.connection_lost()

    async def _reconnected(self) -> None:
        if self._directory is not None:
            self._directory.hear()
            self._directory.restart_watch()
        self._inbox.reconnected()
        self.governance.restart_watches()
        if self._registration is not None and self._state == "ready":
            with contextlib.suppress(MeshError):
                await self._registration.reconnected()

    async def drain(self) -> None:
        """Stop gracefully: deregister, stop listening, let in-flight work finish (bounded),
        then close. Safe to call twice."""
        if self._state in ("closed", "draining"):
            revoked = self._revoked_drain
            if revoked is not None and asyncio.current_task() is not revoked:
                await asyncio.shield(revoked)  # the drain a revocation started: let it finish
            return
        registration = self._registration if self._state == "ready" else None
        self._state = "draining"
        await cancel_and_wait((self._heartbeat, self._reporter))
        if registration is not None:
            # A signed announcement: callers stop picking this instance for new calls. In-flight
            # work still finishes here (a keyed call that times out meanwhile may move and run
            # twice: the documented window).
            with contextlib.suppress(MeshError):
                await registration.register(STATE_DRAINING)
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
                except Exception as exc:  # the type at ERROR, the traceback at DEBUG only
                    log.error(
                        "mesh.stop_hook_failed", agent=self.name, error_type=type(exc).__name__
                    )
                    log.debug("mesh.stop_hook_traceback", agent=self.name, exc_info=True)
        if self._reporter is not None and self.transport.connected:
            # The last counts, after in-flight work and stop hooks (not when NATS is gone).
            try:
                await asyncio.wait_for(self._report_signals(final=True), 1.0)
            except TimeoutError:
                log.warning("mesh.signals_report_failed", error_type="TimeoutError")
        await self.client.traffic.close()
        await self.governance.close()
        if registration is not None:
            with contextlib.suppress(MeshError):
                await registration.withdraw()
        if inbox_sub is not None:
            with contextlib.suppress(Exception):
                await inbox_sub.unsubscribe()
        if self._directory is not None:
            await self._directory.close()
        await self.transport.close()
        self._state = "closed"
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the mesh has closed: after ``drain``, including the drain an agent starts
        by itself when its own certificate is revoked."""
        await self._closed.wait()

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

    async def schemas(self, agent: str, *, timeout: float = 10.0) -> dict[str, EndpointSchema]:
        """The published schemas of ``agent``'s endpoints, verified: the JSON Schemas of each
        endpoint's input and output (of each chunk, for a streaming endpoint), fetched from a
        live instance's ``$SRV`` INFO reply and checked against the hashes in its signed
        directory record (``docs/protocol.md`` section 19), so neither the broker nor anyone
        answering on it can pass off other schemas. One instance answers (the next is asked
        when it does not): during a rollout, instances of two versions may differ.

        Args:
            agent: the agent.
            timeout: seconds for the whole lookup: waiting for an instance, then its reply.

        Returns:
            Endpoint name to ``EndpointSchema`` (``input``, ``output``, ``hash``, ``streams``,
            ``idempotent``); the schemas of an endpoint whose record carries no hash (an
            instance of an older natsmesh) are ``None``.

        Raises:
            Unauthenticated: the schemas served do not match the instance's signed record.
            Unavailable: no live instance, or none answered in time (``$SRV`` INFO is off with
                ``MeshConfig(services=False)``).
        """
        validate_name("agent", agent)
        deadline = time.monotonic() + timeout
        await self.wait_for(agent, timeout)
        return await fetch_schemas(self.transport, agent, self.directory.instances(agent), deadline)

    # --- calls and events --------------------------------------------------------------------

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
    ) -> M:
        """Call ``endpoint`` of ``agent`` and return its reply as ``reply_type``.

        Cancelling the awaiting task cancels the call at the callee too (its handler, and
        every call that one made in turn).

        Args:
            agent: callee agent name.
            endpoint: endpoint name.
            body: the request model.
            reply_type: the model the reply is parsed into.
            timeout: seconds from now (default: the policy's, else ``Timeouts.request``).
            deadline: absolute unix time; the earlier of the two applies (nested calls pass
                their inherited deadline here).
            idempotency_key: makes a non-idempotent call safe to retry; the callee runs it
                at most once per key (per instance, within the reply-cache TTL).
            traceparent / tracestate: W3C trace context to carry.
            metadata: request metadata: at most 16 string keys and values, authenticated with
                the request (readable by the broker, like the endpoint name: no secrets),
                matched by policy routes and given to the handler (``ctx.metadata``).
            on_progress: called with each progress report of the handler (``ctx.progress``);
                asks the callee to send them.
            idle_timeout: fail with ``DeadlineExceeded`` when neither the reply nor a progress
                report arrived for this many seconds (a long call that reports progress lives
                until its deadline; one that went silent fails early).
            chain: the delegation chain this call carries on (handlers: ``ctx.delegation``,
                which ``ctx.request`` passes itself).
            delegate: start a delegation chain (without ``chain``), or narrow the one carried
                on: the calls, scopes, depth and budgets the callee and everyone after it get
                (``docs/delegation.md``).

        Raises:
            MeshError: the subclass matching the failure (``PermissionDenied``,
                ``DeadlineExceeded``, ``Unavailable``, ``Internal``, ...).
        """
        self._require_ready()
        payload = await self.client.call(
            agent,
            endpoint,
            body.__pydantic_serializer__.to_json(body),
            timeout=timeout,
            deadline=deadline,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            tracestate=tracestate,
            metadata=metadata,
            on_progress=on_progress,
            idle_timeout=idle_timeout,
            chain=chain,
            delegate=delegate,
        )
        try:
            return reply_type.model_validate_json(payload)
        except ValidationError as exc:
            raise InvalidArgument(
                f"reply of {agent}.{endpoint} does not match {reply_type.__name__}: "
                f"{exc.error_count()} validation error(s)"
            ) from None

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
    ) -> Stream[M]:
        """Call a streaming endpoint of ``agent``: ``async for chunk in mesh.stream(...)``.

        Nothing is sent until the iteration starts; the request goes through policy, the
        deadline and retries (until the first frame arrives) like ``request``. Every chunk is
        sealed and checked to be the next one; the end is authenticated, so a stream cannot be
        cut short or spliced unnoticed (``StreamBroken``, or ``DeadlineExceeded`` when the end
        never comes). Leaving the loop early (``break``, an exception, a cancelled task)
        cancels the handler at the callee. ``async with`` closes the stream at once.

        Args:
            chunk_type: the model each chunk is parsed into.
            timeout / deadline / metadata / traceparent / tracestate: as for ``request``; the
                deadline bounds the whole stream.
            credit: chunks the callee may send ahead of those read (default 16, at most
                1024): a slow reader holds the callee, and memory, within it.
            idle_timeout: fail with ``DeadlineExceeded`` when nothing (chunk or progress)
                arrived for this many seconds.
            on_progress: called with each progress report (also ``Stream.progress``).
            chain / delegate: as for ``request``.

        Raises:
            InvalidArgument: at once, for bad arguments; the errors of ``request`` while
                iterating.
        """
        what = f"{agent}.{endpoint}"
        payload = body.__pydantic_serializer__.to_json(body)
        return self._stream(
            agent, endpoint, payload, model_chunk(chunk_type, what), credit, timeout, deadline,
            idle_timeout, on_progress, metadata, traceparent, tracestate, chain, delegate,
        )  # fmt: skip

    def stream_json(
        self,
        agent: str,
        endpoint: str,
        body: bytes | str | Mapping[str, Any],
        *,
        timeout: float | None = None,
        credit: int | None = None,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        delegate: Delegate | None = None,
    ) -> Stream[Any]:
        """``stream`` with a JSON body, each chunk parsed as JSON (``mesh-policy call`` of a
        streaming endpoint, the HTTP gateway's server-sent events).

        Args:
            deadline / traceparent / tracestate / delegate: as for ``stream``.

        Raises:
            InvalidArgument: ``body`` is not JSON (nothing is sent); a chunk is not JSON.
        """
        what = f"{agent}.{endpoint}"
        return self._stream(
            agent, endpoint, _json_body(body), json_chunk(what), credit, timeout, deadline, None,
            None, metadata, traceparent, tracestate, None, delegate,
        )  # fmt: skip

    def _stream(
        self,
        agent: str,
        endpoint: str,
        payload: bytes,
        parse: Callable[[bytes], T],
        credit: int | None,
        timeout: float | None,
        deadline: float | None,
        idle_timeout: float | None,
        on_progress: Callable[[Progress], None] | None,
        metadata: Mapping[str, str] | None,
        traceparent: str | None,
        tracestate: str | None,
        chain: Delegation | None,
        delegate: Delegate | None,
    ) -> Stream[T]:
        self._require_ready()
        window = DEFAULT_CREDIT if credit is None else credit
        if not 1 <= window <= MAX_CREDIT:
            raise InvalidArgument(f"stream credit must be 1 to {MAX_CREDIT}, not {window}")

        async def open_stream(state: StreamState) -> bytes:
            return await self.client.call(
                agent,
                endpoint,
                payload,
                timeout=timeout,
                deadline=deadline,
                idempotency_key=None,
                traceparent=traceparent,
                tracestate=tracestate,
                metadata=metadata,
                stream=state,
                idle_timeout=idle_timeout,
                chain=chain,
                delegate=delegate,
            )

        return Stream(open_stream, parse, window, on_progress, f"{agent}.{endpoint}")

    async def request_json(
        self,
        agent: str,
        endpoint: str,
        body: bytes | str | Mapping[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        delegate: Delegate | None = None,
    ) -> Any:
        """Call ``endpoint`` of ``agent`` with a JSON body and return the reply parsed as JSON
        (for tools and shells that have no models: ``mesh-policy call``, the HTTP gateway).

        Args:
            agent: callee agent name.
            endpoint: endpoint name.
            body: the JSON text (``bytes`` or ``str``, checked to be JSON before anything is
                sent) or a mapping to serialize.
            timeout: seconds from now (default: the policy's, else ``Timeouts.request``).
            idempotency_key / metadata / deadline / traceparent / tracestate / delegate: as
                for ``request``.

        Raises:
            InvalidArgument: ``body`` is not JSON (nothing is sent), or the reply is not JSON.
            MeshError: the subclass matching the failure, as for ``request``.
        """
        payload = _json_body(body)
        self._require_ready()
        reply = await self.client.call(
            agent,
            endpoint,
            payload,
            timeout=timeout,
            deadline=deadline,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            tracestate=tracestate,
            metadata=metadata,
            delegate=delegate,
        )
        try:
            return json.loads(reply)
        except ValueError:
            raise InvalidArgument(f"reply of {agent}.{endpoint} is not JSON") from None

    async def publish(
        self,
        topic: str,
        event: BaseModel,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
        chain: Delegation | None = None,
    ) -> None:
        """Publish a signed event on ``topic`` as this agent. ``chain``: the delegation chain
        the event is part of (``ctx.publish`` passes the request's): it travels, signed with
        the event, with one more link for any subscriber that allows no further call.

        Raises:
            MessageTooLarge: the event exceeds ``Limits.max_body``.
        """
        self._require_ready()
        await self._events.publish(topic, event, traceparent, tracestate, chain)

    # --- for handlers, hooks and the control plane -------------------------------------------

    async def subscribe_raw(
        self, subject: str, handler: Callable[[InboundMessage], Awaitable[None]]
    ) -> None:
        """Subscribe a plain handler for a control-plane protocol (e.g. enrolment); it is
        drained with the agent."""
        self._subs.append(await self.transport.subscribe(subject, handler))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run background work that drain waits for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def policy_changed(self) -> None:
        """Acknowledge (or refuse) a policy revision in the directory record at once."""
        if self._registration is not None and self._state == "ready":
            self.spawn(self._registration.register_quietly())

    async def replace_certificate(self, cert: Certificate) -> None:
        """Switch to a renewed certificate for the same keys; callers see it at once."""
        self.identity = Identity(
            keys=self.identity.keys, certificate=cert, root_public_key=self.identity.root_public_key
        )
        self.client.cert_raw = cert.raw
        self.client.identity = self.identity
        for listener in self.certificate_listeners:
            listener(self.identity)
        if self._registration is not None and self._state == "ready":
            await self._registration.register_quietly()

    async def _report_signals(self, *, final: bool = False) -> None:
        """Send this instance's golden signals per edge to the registry: periodically, or
        once with ``final`` (from ``drain``: a caller that lives less than an interval is
        counted too). Failures are logged, never raised."""
        while final or self._state == "ready" or self._state == "starting":
            if not final:
                await asyncio.sleep(self.config.signals_interval)
            try:
                report = self.signals.snapshot_and_reset(time.time())
                traffic = self.client.traffic
                report.circuits = {d: s for d, s in traffic.circuits().items() if s != "closed"}
                report.ejected = traffic.ejected()
                if report.edges or report.circuits or report.ejected:
                    await self.publish(SIGNALS_TOPIC, report)
                    if final:
                        await self.transport.flush(1.0)  # out before the connection closes
            except Exception as exc:  # reporting must never stop, nor fail a drain
                log.warning("mesh.signals_report_failed", error_type=type(exc).__name__)
            if final:
                return


def _json_body(body: bytes | str | Mapping[str, Any]) -> bytes:
    """``body`` as JSON bytes: text is checked to be one JSON value, a mapping serialized.

    Raises:
        InvalidArgument: it is not valid JSON (or a mapping that JSON cannot represent).
    """
    if isinstance(body, Mapping):
        try:
            return json.dumps(body, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"body is not JSON-serializable: {exc}") from None
    raw = body.encode() if isinstance(body, str) else bytes(body)
    try:
        json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"body is not valid JSON: {exc}") from None
    return raw


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
