"""Signed events: publishing as this agent, and receiving the topics the agent handles.

Publishing: validate the topic and trace context, encode, sign (Ed25519 over the subject
prefix, header and body), send on ``<prefix>.evt.<agent>.<topic>``. Receiving: size, decode,
then admission (``mesh._core.admission.admit_event``: subject, replay, readable headers,
certificate, signature), then each handler in a task of its own. A bad signature never reaches
a handler.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import BaseModel, ValidationError

from mesh._core.admission import admit_event
from mesh._core.config import MeshConfig
from mesh._core.crypto import SIG_LEN, ReplayGuard, sign_frame
from mesh._core.delegation import (
    EVENT_AUDIENCE,
    Delegate,
    Delegation,
    LinkCache,
    encode_chain,
    extend,
    verify_chain,
)
from mesh._core.envelope import (
    FRAME_OVERHEAD,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    Header,
    Kind,
    check_trace_context,
    decode_frame,
    encode_frame,
)
from mesh._core.identity import CertificateVerifier, Identity
from mesh._core.names import event_subject, validate_name
from mesh._log import get_logger
from mesh._runtime.agent import Context, EventSpec, Peer
from mesh._runtime.ports import MeshHandle, MeshStats
from mesh._transport.base import InboundMessage, Transport
from mesh.errors import InvalidArgument, MeshError, MessageTooLarge

__all__ = ["EventPublisher", "EventReceiver"]

log = get_logger(__name__)
_TO_SUBSCRIBERS = Delegate(calls=(), depth=0)
"""An event's link: subscribers learn who the work was for, and may do nothing on its behalf."""


class EventPublisher:
    """Publishes this agent's signed events.

    Args:
        identity: a getter for the current identity (its certificate changes on renewal).
        config: prefix and limits.
        transport: the broker connection.
    """

    def __init__(
        self, identity: Callable[[], Identity], config: MeshConfig, transport: Transport
    ) -> None:
        self._identity = identity
        self._prefix = config.prefix
        self._max_body = config.limits.max_body
        self._transport = transport

    async def publish(
        self,
        topic: str,
        event: BaseModel,
        traceparent: str | None = None,
        tracestate: str | None = None,
        chain: Delegation | None = None,
    ) -> None:
        """Sign and send ``event`` on ``topic``, with ``chain`` extended by a link for any
        subscriber (``to`` = ``"*"``, no calls, no further hop) when given and not exhausted.

        Raises:
            InvalidArgument: a bad topic name or trace context.
            MessageTooLarge: the event exceeds ``Limits.max_body``.
        """
        validate_name("topic", topic)
        check_trace_context(traceparent, tracestate)
        payload = event.__pydantic_serializer__.to_json(event)
        if len(payload) > self._max_body:
            raise MessageTooLarge(
                f"event body is {len(payload)} bytes, the limit is {self._max_body}"
            )
        identity = self._identity()
        cert = identity.certificate
        header = Header(
            kind=Kind.EVENT,
            id=os.urandom(16),
            ts=int(time.time() * 1000),
            from_agent=cert.agent,
            from_instance=cert.instance,
            name=topic,
            cert=cert.raw,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        if chain is not None and chain.remaining >= 1 and chain.expires > header.ts:
            link = extend(
                identity.keys.signing, cert, chain, to=EVENT_AUDIENCE, endpoint=topic,
                req=header.id, exp_ms=chain.expires, narrowing=_TO_SUBSCRIBERS,
            )  # fmt: skip
            header.chain = encode_chain((*chain.links, link))
        frame, _ = encode_frame(header, payload)
        frame += sign_frame(identity.keys.signing, frame, self._prefix)
        headers: dict[str, str] = {}
        if traceparent is not None:
            headers[HDR_TRACEPARENT] = traceparent
        if tracestate is not None:
            headers[HDR_TRACESTATE] = tracestate
        await self._transport.publish(
            event_subject(self._prefix, cert.agent, topic), frame, headers=headers or None
        )


class EventReceiver:
    """The handlers of one subscribed subject (one or more ``on_event`` declarations).

    Args:
        mesh: the running mesh (handlers' ``Context`` holds it).
        specs: the declarations sharing the subject.
        config: prefix, limits and the replay window.
        verifier: certificate verification.
        stats: where refusals are counted.
        spawn: runs a handler's task so that drain waits for it.
    """

    def __init__(
        self,
        mesh: MeshHandle,
        specs: list[EventSpec],
        config: MeshConfig,
        verifier: CertificateVerifier,
        stats: MeshStats,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._mesh = mesh
        self._specs = specs
        self._prefix = config.prefix
        self._max_frame = config.limits.max_body + FRAME_OVERHEAD
        self._max_signed = config.limits.max_body + SIG_LEN
        self._replay = ReplayGuard(
            config.timeouts.replay_window,
            max_future=config.timeouts.max_future,
            max_entries=config.limits.seen_cache,
            # Built when subscribing: an event dated earlier never reached this subscription,
            # so a copy of it (captured before a restart) is a replay.
            not_before_ms=int(time.time() * 1000),
            noun="event",
        )
        self._verifier = verifier
        self._stats = stats
        self._spawn = spawn
        self._links = LinkCache()

    async def on_event(self, msg: InboundMessage) -> None:
        """Admit one event and hand it to each handler."""
        data = msg.data
        if len(data) > self._max_frame:
            self._stats.refuse(MessageTooLarge.code)
            return
        try:
            hdr, end = decode_frame(data)
            cert, signed = admit_event(
                hdr,
                end,
                data,
                msg.subject,
                msg.headers,
                expected_subject=event_subject(self._prefix, hdr.from_agent or "", hdr.name or ""),
                max_signed=self._max_signed,
                replay=self._replay,
                verifier=self._verifier,
                prefix=self._prefix,
            )
            delegation = None
            if hdr.chain is not None:  # signed with the event: verified above with it
                delegation = verify_chain(
                    hdr.chain, verifier=self._verifier, cache=self._links,
                    now_ms=time.time() * 1000, agent=self._mesh.name, endpoint=hdr.name or "",
                    request_id=hdr.id, sender=(cert.agent, cert.instance), deadline_ms=0,
                    reentrant=True, event=True,
                )  # fmt: skip
        except MeshError as exc:
            self._stats.refuse(exc.code)
            return
        peer = Peer(cert.agent, cert.instance, cert.roles, cert.serial)
        for spec in self._specs:
            try:
                event = spec.event_type.model_validate_json(signed[end:])
            except ValidationError:
                self._stats.refuse(InvalidArgument.code)
                continue
            ctx = Context(
                mesh=self._mesh,
                caller=peer,
                endpoint=spec.topic,
                traceparent=hdr.traceparent,
                tracestate=hdr.tracestate,
                delegation=delegation,
                carries=False,
            )
            self._spawn(_run_event(spec, event, ctx))


async def _run_event(spec: EventSpec, event: BaseModel, ctx: Context) -> None:
    try:
        if spec.wants_context:
            await spec.handler(event, ctx)
        else:
            await spec.handler(event)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error(
            "mesh.event_handler_failed",
            topic=spec.topic,
            sender=ctx.caller.agent,
            error_type=type(exc).__name__,
        )
        log.debug("mesh.event_handler_traceback", topic=spec.topic, exc_info=True)
