"""The server pipeline: one request from its arrival on the instance's subject to the reply.

The stages, in the normative order of ``docs/protocol.md`` section 11 (cheapest rejection
first; the numbers are that section's steps)::

    decode      1       the frame's prefix and header                  refused unsealed
    admit       2-12    size, kind, addressing, replay, deadline, readable headers,
                        certificate, rate-limit peek (refused sealed), open the seal,
                        record the id
    ----------- 13      no reply subject: dropped
    endpoint    14      this instance serves it                        answered sealed
    delegate    14a     the delegation chain, when the request has one: verified offline,
                        narrowing, depth, loops (``mesh._core.delegation``)
    authorize   15-16   policy decision (named rule, on the chain too) and rate-limit take
    ----------- from here in a task per request
    budget      17a     a chain's shared call budget, debited (``mesh._runtime.budgets``)
    dedupe      17      the reply cache of an idempotency key, then for a non-idempotent
                        endpoint its claim across instances (``mesh._runtime.claims``)
    queue       18      a concurrency slot, within the deadline
    run         19-20   validate the body, run the handler in the remaining time
    reply       21      seal the reply to the caller

Steps 1 to 16 run in the message callback with no await between the replay check and its
recording. ``accept_stages`` (14 to 16) is the list a new check joins; each stage takes the
``Exchange`` and raises the ``MeshError`` to answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from mesh._core.admission import SealedRefusal, admit_request, too_large
from mesh._core.claims import Outcome
from mesh._core.config import MeshConfig
from mesh._core.crypto import NONCE_LEN, TAG_LEN, PairKeys, ReplayGuard, open_frame, seal_frame
from mesh._core.delegation import Delegation, LinkCache, verify_chain
from mesh._core.envelope import (
    FRAME_OVERHEAD,
    MAX_CREDIT,
    OP_CANCEL,
    OP_CREDIT,
    PROGRESS,
    Header,
    Kind,
    decode_frame,
    encode_frame,
    reply_header,
)
from mesh._core.identity import CertificateVerifier
from mesh._core.policy import Route
from mesh._core.signals import EdgeKey, EdgeStats
from mesh._log import get_logger
from mesh._runtime.agent import Agent, Context, EndpointSpec, Peer
from mesh._runtime.budgets import BudgetLedger
from mesh._runtime.claims import ClaimStore, HeldClaim
from mesh._runtime.concurrency import DEFAULT_MAX_QUEUE, ConcurrencyLimit, ReplyCache
from mesh._runtime.governance import Governance
from mesh._runtime.ports import EndpointStats, MeshHandle, MeshStats, Observer
from mesh._runtime.registry_api import ADMIN_ROLE, REGISTRY
from mesh._transport.base import InboundMessage, Transport
from mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    DecodeError,
    Internal,
    InvalidArgument,
    MeshError,
    MessageTooLarge,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = ["Exchange", "ServerPipeline", "error_body"]

log = get_logger(__name__)
OK = "OK"
NO_ID = bytes(16)
UNAUTHENTICATED = "(unauthenticated)"
"""The caller of a request refused before its certificate verified, in signals and logs."""
UNKNOWN_ENDPOINT = "(unknown)"


def error_body(exc: MeshError) -> bytes:
    """The body of a sealed error reply: the error's wire fields without its code."""
    wire = exc.to_wire()
    wire.pop("code", None)
    return json.dumps(wire).encode()


@dataclass(slots=True)
class Exchange:
    """One authenticated request as it travels through the server stages."""

    msg: InboundMessage
    hdr: Header
    peer: Peer
    key: bytes
    body: bytes
    spec: EndpointSpec | None = None
    route: Route | None = None
    started: bool = False  # the handler was called (a cancel then may leave it half done)
    task: asyncio.Task[None] | None = None
    cancelled: bool = False  # by the caller's sealed cancel (not by a drain)
    seq: int = 0  # the next reply frame's sequence number
    credit: int = 0  # chunks the caller granted so far (a stream)
    sent: int = 0  # chunks sent
    waiter: asyncio.Future[None] | None = None  # a stream waiting for credit
    last_progress: float = 0.0
    chain: bytes | None = None  # the delegation chain as received
    delegation: Delegation | None = None  # ... once verified


class ServerPipeline:
    """The callee's side of request/reply for one agent instance.

    Args:
        mesh: the running mesh (handlers' ``Context`` holds it).
        agent: the agent definition served.
        config: limits and timeouts.
        governance: the policy in force.
        verifier / pair: certificate verification and pair keys.
        transport: the broker connection.
        observer / signals / stats: where requests are reported.
        spawn: runs a request's task so that drain waits for it.
    """

    def __init__(
        self,
        *,
        mesh: MeshHandle,
        agent: Agent,
        config: MeshConfig,
        governance: Governance,
        verifier: CertificateVerifier,
        pair: PairKeys,
        transport: Transport,
        observer: Observer,
        signals: EdgeStats,
        stats: MeshStats,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self._mesh = mesh
        self._agent = agent
        self.name = agent.name
        self.instance = mesh.instance
        self._governance = governance
        self._verifier = verifier
        self._pair = pair
        self._transport = transport
        self._observer = observer
        self._signals = signals
        self._stats = stats
        self._spawn = spawn
        limits = config.limits
        self._max_body = limits.max_body
        self._max_frame = limits.max_body + FRAME_OVERHEAD
        self._max_sealed = limits.max_body + NONCE_LEN + TAG_LEN
        # Requests dated before this instance existed are refused: the seen-cache is in
        # memory, so one captured before a restart would otherwise be served again after it.
        self.replay = ReplayGuard(
            config.timeouts.replay_window,
            max_future=config.timeouts.max_future,
            max_entries=limits.seen_cache,
            not_before_ms=int(time.time() * 1000),
        )
        self.replies = ReplyCache(limits.reply_cache_ttl)
        # Claims across instances, for keyed calls to non-idempotent endpoints only: an
        # idempotent endpoint may run twice by definition.
        self.claims: ClaimStore | None = None
        if config.claims and any(not s.idempotent for s in agent.endpoints.values()):
            self.claims = ClaimStore(
                mesh=mesh, transport=transport, verifier=verifier, pair=pair,
                window=config.timeouts.claim_window, max_future=config.timeouts.max_future,
                max_value=limits.max_body + 16384, replicas=config.replicas,
            )  # fmt: skip
        self.endpoint_stats = {name: EndpointStats() for name in agent.endpoints}
        # Admins' control-plane calls to the registry (`mesh-policy top`, `apply`, ...) are
        # not the mesh's traffic: the registry keeps their signals aside, never reported.
        self._quiet_role = ADMIN_ROLE if agent.name == REGISTRY else None
        self._quiet_signals = EdgeStats(agent.name, mesh.instance)
        self._limits = {
            s.name: ConcurrencyLimit(s.concurrency or limits.endpoint_concurrency)
            for s in agent.endpoints.values()
        }
        self.running: dict[bytes, Exchange] = {}
        """The requests accepted and not yet answered, by request id: what a caller's cancel
        or credit is about."""
        self._credit_wait = config.timeouts.credit_wait
        self.accept_stages: tuple[Callable[[Exchange], None], ...] = (
            self.endpoint,
            self.delegate,
            self.authorize,
        )
        self._links = LinkCache()
        self.budgets: BudgetLedger | None = None
        """The shared budgets of delegation chains, opened when a chain with one arrives."""
        self._replicas = config.replicas
        self._prefix = config.prefix

    # --- in the message callback: steps 1 to 16 ----------------------------------------------

    async def on_request(self, msg: InboundMessage) -> None:
        """Decode and admit a request, accept it, then serve it in a task of its own."""
        data = msg.data
        try:
            hdr, end = decode_frame(data)  # 1; bounded: a header is at most 16 KiB
        except DecodeError as exc:
            too_big = len(data) > self._max_frame
            refusal = too_large(len(data)) if too_big else exc
            self._stats.refuse(refusal.code)  # no header: nothing more to count it by
            await self._refuse(msg, NO_ID, refusal)
            return
        if hdr.kind == Kind.CONTROL:
            self.control(hdr, data, end)
            return
        try:
            cert, key, body = admit_request(
                hdr, end, data, msg.subject, msg.headers,
                agent=self.name, instance=self.instance, now_ms=time.time() * 1000,
                max_sealed=self._max_sealed, replay=self.replay, verifier=self._verifier,
                pair=self._pair, peek=self._governance.rate_peek,
            )  # fmt: skip
        except DeadlineExceeded as exc:
            # The caller has stopped waiting (its own timer fired): nothing to answer.
            self._refused(msg, hdr, None, exc)
            return
        except SealedRefusal as refusal:
            # The rate-limit peek runs once the certificate verified (step 9 matched it to
            # the header's sender): the caller is known.
            self._refused(msg, hdr, hdr.from_agent, refusal.error)
            await self._refuse_sealed(msg, hdr, refusal.key, refusal.error)
            return
        except MeshError as exc:
            self._refused(msg, hdr, None, exc)
            await self._refuse(msg, hdr.id, exc)
            return
        if not msg.reply:  # 13
            return
        # From here on the caller is authenticated: errors travel sealed.
        peer = Peer(cert.agent, cert.instance, cert.roles, cert.serial, cert)
        ex = Exchange(msg, hdr, peer, key, body)
        if hdr.delegation is not None:  # the chain starts the sealed plaintext
            n = hdr.delegation
            ex.chain, ex.body = body[:n], body[n:]
            if not 0 < n <= len(body):
                ex.chain = b""  # refused by the delegate stage
        try:
            for stage in self.accept_stages:
                stage(ex)
        except MeshError as exc:
            self._refused(msg, hdr, ex.peer.agent, exc)
            await self.reply(ex, exc.code, error_body(exc))
            return
        self.running[hdr.id] = ex
        ex.task = self._spawn(self._tracked(ex))

    async def _tracked(self, ex: Exchange) -> None:
        """``serve``, then forget the request: it is answered (a task's done-callback would
        cost a loop iteration per request). A task cancelled before it started never gets
        here: ``control`` forgets the request it cancels, and drain the rest with the mesh."""
        try:
            await self.serve(ex)
        finally:
            self.running.pop(ex.hdr.id, None)

    def control(self, hdr: Header, data: bytes, end: int) -> None:
        """A CONTROL frame (``docs/protocol.md`` section 21): cancel a call in progress, or
        grant a stream credit. Acted on only when it is about a call this instance is serving,
        comes from that call's caller and opens under the call's pair key; anything else is
        dropped and counted. A copy does nothing more than the original did."""
        ex = self.running.get(hdr.reply_to or b"")
        if (
            ex is None
            or hdr.from_instance != ex.hdr.from_instance
            or hdr.from_agent != ex.hdr.from_agent
            or hdr.to_instance != self.instance
            or len(data) - end != NONCE_LEN + TAG_LEN  # a control frame's body is empty
        ):
            self._stats.dropped_controls += 1
            return
        try:
            open_frame(ex.key, data, end)
        except Unauthenticated:
            self._stats.dropped_controls += 1
            return
        if hdr.op == OP_CANCEL:
            if not ex.cancelled and ex.task is not None:
                ex.cancelled = True
                ex.task.cancel()
                if not ex.started:  # perhaps not even running yet: nothing else forgets it
                    self.running.pop(hdr.reply_to or b"", None)
        elif hdr.op == OP_CREDIT and hdr.credit is not None:
            if hdr.credit > ex.credit and hdr.credit - ex.sent <= MAX_CREDIT:
                ex.credit = hdr.credit
                waiter = ex.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        else:
            self._stats.dropped_controls += 1

    def _refused(
        self, msg: InboundMessage, hdr: Header, caller: str | None, exc: MeshError
    ) -> None:
        """Count a request refused after its header decoded, wherever served requests are
        counted: by code, in the endpoint's stats, the edge signals and the access log, and,
        once the caller is authenticated (``caller`` set), as a SERVER span naming the rule.

        Before authentication the caller is one bucket, and the endpoint name is folded to
        ``(unknown)`` unless this instance serves it: senders cannot grow the tables.
        """
        code = exc.code
        self._stats.refuse(code)
        name = hdr.name or ""
        stats = self.endpoint_stats.get(name)
        if stats is not None:
            stats.refuse(code)
        endpoint = name if stats is not None else UNKNOWN_ENDPOINT
        who = caller if caller is not None else UNAUTHENTICATED
        self._signals.record(who, self.name, endpoint, "server", code, 0.0)
        observer = self._observer
        # The trace context is only checked (step 7) and the sender only verified (step 9)
        # for an authenticated caller: nothing unverified reaches a span or a log line.
        traceparent = hdr.traceparent if caller is not None else None
        if caller is not None:
            span, _, _ = observer.start_server(
                self.name, endpoint, msg.subject, hdr.id, caller, traceparent, hdr.tracestate
            )
            observer.end(span, code, rule=exc.rule)
        if observer.access_log:
            observer.log_access(
                caller=who,
                caller_instance=(hdr.from_instance or "") if caller is not None else "",
                endpoint=endpoint,
                code=code,
                seconds=0.0,
                request_bytes=len(msg.data),
                reply_bytes=0,
                traceparent=traceparent,
                attempt=hdr.attempt or 1,
                rule=exc.rule,
            )

    def endpoint(self, ex: Exchange) -> None:
        """14: this instance serves the endpoint, streamed if and only if it streams."""
        hdr = ex.hdr
        spec = self._agent.endpoints.get(hdr.name or "")
        if spec is None:
            raise NotFound(f"agent {self.name!r} has no endpoint {hdr.name!r}")
        ex.spec = spec
        if spec.streams or hdr.stream is not None:
            _check_stream(spec, hdr)
            ex.credit = hdr.stream or 0

    def delegate(self, ex: Exchange) -> None:
        """14a: the request's delegation chain, verified offline: each link signed by its
        issuer, narrowing the one before, for this request from this caller, not expired, not
        deeper than policy allows, not a loop (unless policy allows re-entry here)."""
        chain = ex.chain
        if chain is None:
            return
        if not chain:
            raise InvalidArgument("delegation chain length out of range")
        hdr, engine = ex.hdr, self._governance.engine
        assert ex.spec is not None and hdr.deadline is not None
        ex.delegation = verify_chain(
            chain, verifier=self._verifier, cache=self._links, now_ms=time.time() * 1000,
            agent=self.name, endpoint=ex.spec.name, request_id=hdr.id,
            sender=(ex.peer.agent, ex.peer.instance), deadline_ms=hdr.deadline,
            max_depth=engine.max_depth, reentrant=engine.reentrant,
        )  # fmt: skip

    def authorize(self, ex: Exchange) -> None:
        """15-16: the policy's decision, naming the rule, then the rate-limit take."""
        assert ex.spec is not None
        ex.route = self._governance.incoming(ex.peer, ex.spec.name, ex.delegation)

    async def _refuse_sealed(
        self, msg: InboundMessage, hdr: Header, key: bytes, exc: MeshError
    ) -> None:
        """A refusal once the pair key is known (step 10): a sealed error REPLY, which the
        caller may act on (an unsealed REFUSAL is only a hint to it)."""
        if not msg.reply:
            return
        aad = reply_header(
            os.urandom(16), int(time.time() * 1000), self.name, self.instance, hdr.from_agent,
            hdr.from_instance, hdr.id, exc.code,
        )  # fmt: skip
        with contextlib.suppress(MeshError):
            await self._transport.publish(msg.reply, seal_frame(key, aad, error_body(exc)))

    async def _refuse(self, msg: InboundMessage, request_id: bytes, exc: MeshError) -> None:
        """An unsealed REFUSAL: the request could not be authenticated (steps 1 to 11, except
        the rate-limit peek). Callers keep it as a hint only."""
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
            await self._transport.publish(msg.reply, encode_frame(header)[0])

    # --- in the request's task: steps 17 to 21 -----------------------------------------------

    async def serve(self, ex: Exchange) -> None:
        """Dedupe, queue, run and reply."""
        spec, hdr = ex.spec, ex.hdr
        assert spec is not None and hdr.deadline is not None
        d = ex.delegation
        if d is not None and (d.budget is not None or d.cost is not None):
            try:
                await self._ledger().spend(d, calls=1)
            except MeshError as exc:
                self._refused(ex.msg, hdr, ex.peer.agent, exc)
                await self.reply(ex, exc.code, error_body(exc))
                return
        ik = hdr.idempotency_key
        cache_key = (ex.peer.agent, spec.name, ik) if ik is not None else None
        cached: asyncio.Future[tuple[str, bytes]] | None = None
        held: HeldClaim | None = None
        if cache_key is not None:
            fingerprint = hashlib.blake2b(ex.body).digest()
            try:
                owner, cached = self.replies.claim(cache_key, fingerprint)
            except MeshError as exc:
                self._refused(ex.msg, hdr, ex.peer.agent, exc)
                await self.reply(ex, exc.code, error_body(exc))
                return
            if not owner:
                await self._replay_cached(ex, cached)
                return
            if self.claims is not None and not spec.idempotent:
                assert ik is not None
                got = await self._claim(ex, ik, fingerprint, cache_key, cached)
                if got is None:
                    return
                held = got
        started = time.perf_counter_ns()
        edge: EdgeKey = (ex.peer.agent, self.name, spec.name, "server")
        signals = self._signals
        if self._quiet_role is not None and self._quiet_role in ex.peer.roles:
            signals = self._quiet_signals
        signals.enter(edge)
        span, traceparent, tracestate = self._observer.start_server(
            self.name, spec.name, ex.msg.subject, hdr.id, ex.peer.agent, hdr.traceparent,
            hdr.tracestate,
        )  # fmt: skip
        ran = False
        try:
            ran, status, payload = await self.run(ex, traceparent, tracestate)
        except asyncio.CancelledError:
            if cache_key is not None and cached is not None:
                self.replies.forget(cache_key)
                cached.cancel()
            if held is not None:
                # Started: it may have run in part, nobody may run it again. Not started:
                # another attempt may take the claim over.
                end = held.abort() if ex.started else held.release()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(end, 0.5)
            elapsed = time.perf_counter_ns() - started
            if ex.cancelled:  # the caller's own cancel: it no longer waits for an answer
                why: MeshError = Cancelled(f"the caller cancelled {spec.name}")
            else:
                why = Unavailable(f"{self.name} shut down before {spec.name} finished")
            self._account(ex, why.code, b"", elapsed)
            signals.finish(edge, why.code, elapsed / 1e9)
            self._observer.end(span, why.code)
            if not ex.cancelled:
                with contextlib.suppress(Exception):
                    await self.reply(ex, why.code, error_body(why))
            raise
        elapsed = time.perf_counter_ns() - started
        self._account(ex, status, payload, elapsed)
        signals.finish(edge, status, elapsed / 1e9)
        self._observer.end(span, status)
        if held is not None:
            # On record before the reply is sent: a reply the caller got is never unknown.
            await (held.finish(status, payload) if ran else held.release())
        if cache_key is not None and cached is not None:
            if ran:
                cached.set_result((status, payload))
            else:
                self.replies.forget(cache_key)
                cached.cancel()
        await self.reply(ex, status, payload)

    def _ledger(self) -> BudgetLedger:
        if self.budgets is None:
            self.budgets = BudgetLedger(self._transport, self._prefix, self._replicas)
        return self.budgets

    async def _claim(
        self,
        ex: Exchange,
        ik: str,
        fingerprint: bytes,
        cache_key: tuple[str, str, str],
        cached: asyncio.Future[tuple[str, bytes]],
    ) -> HeldClaim | None:
        """17, non-idempotent endpoint: the claim across instances (``ClaimStore.acquire``).

        Returns the claim to run the handler under, or ``None`` once the request has been
        answered (another instance's outcome, an honest error) or dropped (deadline passed).
        Duplicates waiting on this instance's reply cache get the same answer.
        """
        assert self.claims is not None and ex.spec is not None and ex.hdr.deadline is not None
        try:
            got = await self.claims.acquire(
                caller=ex.peer.agent, endpoint=ex.spec.name, ik=ik, fingerprint=fingerprint,
                deadline=ex.hdr.deadline / 1000,
            )  # fmt: skip
        except asyncio.CancelledError:
            self.replies.forget(cache_key)
            cached.cancel()
            raise
        except MeshError as exc:
            # Not kept: a later duplicate asks the claims bucket again (it may know more).
            self.replies.forget(cache_key)
            cached.set_result((exc.code, error_body(exc)))
            self._refused(ex.msg, ex.hdr, ex.peer.agent, exc)
            await self.reply(ex, exc.code, error_body(exc))
            return None
        if got is None:  # the deadline passed while another instance ran it
            self.replies.forget(cache_key)
            cached.cancel()
            return None
        if isinstance(got, Outcome):
            assert got.body is not None
            cached.set_result((got.status, got.body))
            self.endpoint_stats[ex.spec.name].replayed_from_cache += 1
            await self.reply(ex, got.status, got.body)
            return None
        return got

    async def _replay_cached(self, ex: Exchange, cached: asyncio.Future[tuple[str, bytes]]) -> None:
        """17: answer a retried keyed request with the first run's reply, waiting for it."""
        assert ex.spec is not None and ex.hdr.deadline is not None
        try:
            status, payload = await asyncio.wait_for(
                asyncio.shield(cached), max(0.0, ex.hdr.deadline / 1000 - time.time())
            )
        except TimeoutError:
            return  # the caller's deadline passed; it no longer waits
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return  # the first attempt was abandoned; the caller will retry
        self.endpoint_stats[ex.spec.name].replayed_from_cache += 1
        await self.reply(ex, status, payload)

    async def run(
        self, ex: Exchange, traceparent: str | None, tracestate: str | None
    ) -> tuple[bool, str, bytes]:
        """18-20: a concurrency slot, then the handler in the remaining time.

        Returns:
            ``(ran, status, reply body)``: ``ran`` is False when the handler never started.
        """
        spec, hdr = ex.spec, ex.hdr
        assert spec is not None and hdr.deadline is not None
        deadline = hdr.deadline / 1000
        limit = self._limits[spec.name]
        ran = False
        try:
            if not limit.try_acquire():
                await self._queue(ex, limit, deadline)
            try:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise DeadlineExceeded("deadline passed while the request was queued")
                body = _validate(spec, ex.body)
                ran = ex.started = True
                ctx = Context(
                    mesh=self._mesh,
                    caller=ex.peer,
                    endpoint=spec.name,
                    deadline=deadline,
                    attempt=hdr.attempt or 1,
                    idempotency_key=hdr.idempotency_key,
                    traceparent=traceparent,
                    tracestate=tracestate,
                    metadata=hdr.metadata or {},
                    mirrored=hdr.mirror is True,
                    delegation=ex.delegation,
                )
                if ex.delegation is not None and ex.delegation.cost is not None:
                    ctx.spender = functools.partial(self._ledger().spend, ex.delegation, 0)
                if hdr.progress or hdr.stream is not None:
                    ctx.reporter = functools.partial(self._progress, ex)
                async with asyncio.timeout(remaining):
                    if spec.streams:
                        await self._stream(ex, spec, body, ctx)
                        result = None
                    elif spec.wants_context:
                        result = await spec.handler(body, ctx)
                    else:
                        result = await spec.handler(body)
            finally:
                limit.release()
        except MeshError as exc:
            return ran, exc.code, error_body(exc)
        except TimeoutError:
            late = DeadlineExceeded(f"{spec.name} did not finish before the deadline")
            return ran, late.code, error_body(late)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug: the caller gets a safe message only
            # An exception's text may quote the payload: only its type by default, the
            # traceback at debug level.
            log.error(
                "mesh.handler_failed",
                endpoint=spec.name,
                caller=ex.peer.agent,
                error_type=type(exc).__name__,
            )
            log.debug("mesh.handler_traceback", endpoint=spec.name, exc_info=True)
            failed = json.dumps({"message": f"handler {spec.name} failed"}).encode()
            return ran, Internal.code, failed
        if isinstance(result, BaseModel):
            return ran, OK, result.__pydantic_serializer__.to_json(result)
        return ran, OK, b"null"

    async def _stream(
        self, ex: Exchange, spec: EndpointSpec, body: BaseModel, ctx: Context
    ) -> None:
        """20, a streaming endpoint: each chunk the handler yields, sealed and numbered, as
        the caller's credit allows. The generator is closed however the stream ends, so the
        handler's ``finally`` runs."""
        gen = spec.handler(body, ctx) if spec.wants_context else spec.handler(body)
        try:
            async for chunk in gen:
                await self._chunk(ex, spec, chunk)
        finally:
            await gen.aclose()

    async def _chunk(self, ex: Exchange, spec: EndpointSpec, chunk: object) -> None:
        """Send one chunk, once the caller has granted room for it.

        Raises:
            Internal: the handler yielded something that is not a pydantic model.
            MessageTooLarge: the chunk exceeds ``Limits.max_body``.
            Unavailable: the caller granted no credit for ``Timeouts.credit_wait``: it is
                gone or stopped reading (the handler is stopped, holding nothing longer).
        """
        if not isinstance(chunk, BaseModel):
            raise Internal(f"handler {spec.name} yielded a {type(chunk).__name__}, not a model")
        payload = chunk.__pydantic_serializer__.to_json(chunk)
        if len(payload) > self._max_body:
            raise MessageTooLarge(f"chunk of {len(payload)} bytes exceeds the limit")
        while ex.sent >= ex.credit:
            ex.waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                # Not asyncio.wait_for: on Python 3.11 it returns the result, and loses the
                # cancel, when a credit and a cancel arrive in the same read.
                async with asyncio.timeout(self._credit_wait):
                    await waiter
            except TimeoutError:
                raise Unavailable(
                    f"the caller granted no credit for {self._credit_wait:g} s: it is gone "
                    "or stopped reading"
                ) from None
        ex.sent += 1
        await self._frame(ex, OK, payload, end=False)

    async def _progress(self, ex: Exchange, fraction: float, note: str) -> None:
        """A progress frame, at most one per 100 ms (but always the last, ``fraction`` 1)."""
        now = time.monotonic()
        if fraction < 1.0 and now - ex.last_progress < 0.1:
            return
        ex.last_progress = now
        body = json.dumps({"fraction": fraction, "note": note}).encode()
        await self._frame(ex, PROGRESS, body, end=False)

    async def _queue(self, ex: Exchange, limit: ConcurrencyLimit, deadline: float) -> None:
        """18, no free slot: wait in the endpoint's bounded queue, at most until the deadline.

        Raises:
            ResourceExhausted: shed, at once, with a retry-after: the queue is full (policy's
                ``max_queue``), or a caller within its fair share took this one's place.
            DeadlineExceeded: the deadline passed while the request was queued.
        """
        assert ex.spec is not None
        route = ex.route
        max_queue = route.max_queue if route is not None else None
        if max_queue is None:
            max_queue = DEFAULT_MAX_QUEUE
        try:
            got = await asyncio.wait_for(
                limit.acquire(ex.peer.agent, max_queue), max(0.0, deadline - time.time())
            )
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while the request was queued") from None
        if not got:
            raise ResourceExhausted(
                f"{self.name}.{ex.spec.name} is at capacity ({limit.queued} queued)",
                retry_after=limit.retry_after(),
            )

    def _account(self, ex: Exchange, status: str, payload: bytes, elapsed_ns: int) -> None:
        """Endpoint counters and, where asked for, the access log line."""
        spec = ex.spec
        assert spec is not None
        stats = self.endpoint_stats[spec.name]
        stats.requests += 1
        stats.processing_ns += elapsed_ns
        if status != OK:
            stats.errors += 1
            stats.last_error = status
        route = ex.route
        if self._observer.access_log or (route is not None and route.access_log):
            hdr = ex.hdr
            self._observer.log_access(
                caller=ex.peer.agent,
                caller_instance=ex.peer.instance,
                endpoint=spec.name,
                code=status,
                seconds=elapsed_ns / 1e9,
                request_bytes=len(ex.msg.data),
                reply_bytes=len(payload),
                traceparent=hdr.traceparent,
                attempt=hdr.attempt or 1,
                origin=ex.delegation.origin if ex.delegation is not None else None,
            )

    async def reply(self, ex: Exchange, status: str, payload: bytes) -> None:
        """21: seal the reply (or error) to the caller under the pair key: the last frame."""
        if len(payload) > self._max_body:
            exc = MessageTooLarge(f"reply of {len(payload)} bytes exceeds the limit")
            status, payload = exc.code, error_body(exc)
        with contextlib.suppress(MeshError):
            await self._frame(ex, status, payload, end=True)

    async def _frame(self, ex: Exchange, status: str, payload: bytes, *, end: bool) -> None:
        """Seal one reply frame to the caller, numbered in the order sent. The number is
        taken and the frame handed to the connection with no await between: frames leave in
        the order of their numbers."""
        hdr = ex.hdr
        seq = ex.seq
        ex.seq = seq + 1
        aad = reply_header(
            os.urandom(16), int(time.time() * 1000), self.name, self.instance, hdr.from_agent,
            hdr.from_instance, hdr.id, status, seq, end,
        )  # fmt: skip
        reply = ex.msg.reply
        assert reply
        await self._transport.publish(reply, seal_frame(ex.key, aad, payload))


def _check_stream(spec: EndpointSpec, hdr: Header) -> None:
    """14: a streaming endpoint is called with credit (``sm``) and no idempotency key; an
    endpoint that does not stream is not asked to.

    Raises:
        InvalidArgument: naming what is wrong.
    """
    if not spec.streams:
        raise InvalidArgument(f"endpoint {spec.name!r} does not stream: call it with request()")
    if hdr.stream is None:
        raise InvalidArgument(f"endpoint {spec.name!r} streams its reply: call it with stream()")
    if not 1 <= hdr.stream <= MAX_CREDIT:
        raise InvalidArgument(f"stream credit must be 1 to {MAX_CREDIT}, not {hdr.stream}")
    if hdr.idempotency_key is not None:
        raise InvalidArgument("streams take no idempotency key")


def _validate(spec: EndpointSpec, body: bytes) -> BaseModel:
    """19: the request body against the endpoint's input model."""
    try:
        return spec.input_type.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidArgument(
            f"request does not match {spec.input_type.__name__}: "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
