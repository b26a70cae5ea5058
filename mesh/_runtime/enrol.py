"""Enrolment: an agent with a one-time join token gets its first certificate from the registry.

The agent makes its keys locally (they never leave it) and sends, to
``<prefix>.ctl.registry.<registry instance>.enrol``, a sealed box (X25519, anonymous sender)
for that registry instance's box key, containing its agent name, public keys, the token and an
Ed25519 signature proving it holds the signing key. The registry instance is found in the
directory and must hold the ``registry`` role. Only that registry can read the token.

The broker is not trusted, so both directions are guarded:

- every reply, errors included, is signed by the registry instance over the SHA-256 of the
  request it answers; the agent drops any other message on its inbox, so a forged refusal
  never ends an enrolment;
- the agent retries (the same keys, a fresh proof) with backoff until its overall timeout, and
  the registry makes redemption idempotent for the same keys: a retry after a lost reply gets
  the same certificate;
- the registry bounds the work unauthenticated publishers can cause: cheap checks first, a
  CPU budget for opening sealed boxes, an index of the stored tokens so an unknown token costs
  no JetStream round trip, and a separate budget for requests naming a real token.

See ``docs/protocol.md``, Enrolment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from mesh._core.config import MeshConfig
from mesh._core.identity import CertificateVerifier, Identity, InstanceKeys
from mesh._core.names import directory_bucket, enrol_subject, validate_name
from mesh._core.ratelimit import TokenBucket
from mesh._runtime.control import ControlStore
from mesh._runtime.directory import Directory
from mesh._runtime.ports import MeshHandle
from mesh._transport.base import InboundMessage, Transport, is_no_responders
from mesh.errors import (
    DecodeError,
    Internal,
    MeshError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_from_code,
)

__all__ = ["EnrolmentRequest", "enrol", "serve_enrolment"]

REGISTRY_AGENT = "registry"
REGISTRY_ROLE = "registry"
_CONTEXT = b"mesh-enrol-v1"
_REPLY_CONTEXT = b"mesh-enrol-reply-v1"
MAX_ENROL_FRAME = 4096
MIN_ENROL_FRAME = 48  # a sealed box's overhead: anything shorter cannot open
# Sealed boxes a registry instance opens per second (about 0.2 ms of CPU each: open, verify).
ENROL_OPEN_RATE, ENROL_OPEN_BURST = 500.0, 500
# Requests naming a stored token, per second: the only ones that cost JetStream round trips.
ENROL_ISSUE_RATE, ENROL_ISSUE_BURST = 20.0, 40
TOKEN_INDEX_REFRESH_S = 1.0  # the index of stored tokens is re-read at most this often
REPLY_CACHE_SIZE = 1024  # signed replies kept for replays of the same request
ATTEMPT_WAITS = (0.5, 1.0, 2.0)  # the agent's wait for each attempt; the last one repeats
# Authenticated refusals the agent retries (same keys, fresh proof): the registry's trouble.
_RETRY_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True, slots=True)
class EnrolmentRequest:
    """A verified enrolment request, as the registry sees it."""

    agent: str
    token: str
    sign_pk: bytes
    box_pk: bytes


def _proof_bytes(agent: str, token: str, sign_pk: bytes, box_pk: bytes, ts: int) -> bytes:
    return msgpack.packb([_CONTEXT, agent, token, sign_pk, box_pk, ts], use_bin_type=True)


def reply_signed_bytes(
    request: bytes, status: str, message: str, certificate: bytes, context: bytes = _REPLY_CONTEXT
) -> bytes:
    """What the registry signs in a reply: it binds status, message and certificate to the
    SHA-256 ``request`` of the sealed request payload it answers, under ``context`` (one per
    kind of request: an enrolment reply cannot pass for a grace renewal's)."""
    return msgpack.packb([context, request, status, message, certificate], use_bin_type=True)


def sign_reply(
    signing: SigningKey,
    request: bytes,
    status: str,
    message: str = "",
    certificate: bytes = b"",
    context: bytes = _REPLY_CONTEXT,
) -> bytes:
    """A registry reply: a MessagePack map signed by the registry instance's key."""
    signed = reply_signed_bytes(request, status, message, certificate, context)
    sig = signing.sign(signed).signature
    return msgpack.packb(
        {
            "status": status,
            "message": message,
            "certificate": certificate,
            "request": request,
            "sig": sig,
        },
        use_bin_type=True,
    )


def open_reply(
    raw: bytes, registry_pk: VerifyKey, context: bytes = _REPLY_CONTEXT
) -> tuple[bytes, str, str, bytes]:
    """Check a registry reply's signature; returns ``(request hash, status, message, cert)``.

    Raises:
        DecodeError: malformed, or not signed by this registry instance.
    """
    if len(raw) > 2 * MAX_ENROL_FRAME + 512:
        raise DecodeError("enrolment reply too large")
    try:
        body = msgpack.unpackb(raw, raw=False)
        request, status, sig = body["request"], body["status"], body["sig"]
        message, cert = body.get("message", ""), body.get("certificate", b"")
    except Exception as exc:
        raise DecodeError(f"malformed enrolment reply ({type(exc).__name__})") from None
    if not (
        isinstance(request, bytes)
        and isinstance(sig, bytes)
        and isinstance(cert, bytes)
        and isinstance(status, str)
        and isinstance(message, str)
    ):
        raise DecodeError("malformed enrolment reply")
    try:
        registry_pk.verify(reply_signed_bytes(request, status, message, cert, context), sig)
    except (BadSignatureError, ValueError):
        raise DecodeError("enrolment reply is not signed by the registry instance") from None
    return request, status, message, cert


async def enrol(
    config: MeshConfig,
    *,
    agent: str,
    token: str,
    root_public_key: bytes,
    keys: InstanceKeys | None = None,
    transport: Transport,
    own_transport: bool = False,
    timeout: float = 15.0,
) -> Identity:
    """Exchange a join token for a certificate; returns the new identity.

    Only replies signed by the registry instance (found in the directory, its certificate
    verified against the root) count; the request is sent again, with the same keys and a
    fresh proof, until one arrives or ``timeout`` is over.

    Args:
        config: servers and prefix of the mesh.
        agent: the agent name the token was made for.
        token: the one-time join token.
        root_public_key: the trust root the certificate must chain to.
        keys: keys to certify (fresh ones when omitted).
        transport: the broker connection.
        own_transport: connect ``transport`` first and close it after.
        timeout: overall bound in seconds.

    Raises:
        Unauthenticated: the token was refused (unknown, used, expired or for another agent).
        Unavailable: no registry could be reached in time.
    """
    validate_name("agent", agent)
    keys = keys or InstanceKeys.generate()
    own = own_transport
    verifier = CertificateVerifier(root_public_key)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    if own:
        await transport.connect()
    try:
        kv = await transport.key_value(
            directory_bucket(config.prefix),
            ttl=max(3 * config.directory.ttl, 10.0),
            replicas=config.replicas,
        )
        directory = Directory(
            kv.watch, verifier, ttl=config.directory.ttl, max_skew=config.timeouts.max_future
        )
        await directory.start()
        try:
            await directory.watch_agent(REGISTRY_AGENT, max(0.1, end - loop.time()))
            record = await directory.wait_for(REGISTRY_AGENT, max(0.1, end - loop.time()))
        finally:
            await directory.close()
        if REGISTRY_ROLE not in record.certificate.roles:
            raise Unauthenticated("the directory's registry lacks the registry role")
        exchange = _Exchange(
            transport,
            enrol_subject(config.prefix, record.instance),
            VerifyKey(record.certificate.sign_pk),
            PublicKey(record.certificate.box_pk),
        )
        cert_raw = await exchange.run(lambda: _sealed_request(agent, token, keys), end, loop.time)
    finally:
        if own:
            await transport.close()
    cert = verifier.verify(cert_raw)
    if (cert.agent, cert.sign_pk, cert.box_pk) != (agent, keys.sign_pk, keys.box_pk):
        raise Unauthenticated("the registry returned a certificate for other keys")
    return Identity(keys=keys, certificate=cert, root_public_key=root_public_key)


def _sealed_request(agent: str, token: str, keys: InstanceKeys) -> dict[str, Any]:
    ts = int(time.time() * 1000)
    proof = keys.signing.sign(_proof_bytes(agent, token, keys.sign_pk, keys.box_pk, ts))
    return {
        "agent": agent,
        "token": token,
        "sign_pk": keys.sign_pk,
        "box_pk": keys.box_pk,
        "ts": ts,
        "sig": proof.signature,
    }


class _Exchange:
    """The agent's side: send, resend, and take only replies the registry instance signed
    for one of the requests sent."""

    def __init__(
        self,
        transport: Transport,
        subject: str,
        registry_pk: VerifyKey,
        box_pk: PublicKey,
        reply_context: bytes = _REPLY_CONTEXT,
        what: str = "enrolment",
    ) -> None:
        self.transport = transport
        self.reply_context = reply_context
        self.what = what
        self.subject = subject
        self.registry_pk = registry_pk
        self.seal = SealedBox(box_pk)
        self.sent: set[bytes] = set()
        self.replies: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self.dropped = 0
        self.no_responders = False

    async def on_reply(self, msg: InboundMessage) -> None:
        if is_no_responders(msg):
            self.no_responders = True  # a hint only: anyone can publish it on the inbox
            return
        try:
            request, status, message, cert = open_reply(
                msg.data, self.registry_pk, self.reply_context
            )
        except DecodeError:
            self.dropped += 1
            return
        if request not in self.sent:
            self.dropped += 1  # signed, but for another agent's request
            return
        self.replies.put_nowait((status, message, cert))

    async def run(
        self, make_request: Callable[[], dict[str, Any]], end: float, now: Callable[[], float]
    ) -> bytes:
        """The certificate bytes of the first signed OK reply.

        Raises:
            MeshError: a signed refusal that retrying cannot change, or, at ``end``, the last
                signed retryable refusal, else ``Unavailable``.
        """
        inbox = self.transport.new_inbox()
        sub = await self.transport.subscribe(inbox, self.on_reply)
        last: MeshError | None = None
        attempt = 0
        try:
            while (left := end - now()) > 0:
                sealed = self.seal.encrypt(msgpack.packb(make_request(), use_bin_type=True))
                self.sent.add(hashlib.sha256(sealed).digest())
                try:
                    await self.transport.publish(self.subject, sealed, reply=inbox)
                except MeshError as exc:
                    last = exc
                attempt_end = now() + min(ATTEMPT_WAITS[min(attempt, len(ATTEMPT_WAITS) - 1)], left)
                attempt += 1
                while (wait := attempt_end - now()) > 0:
                    try:
                        status, message, cert = await asyncio.wait_for(self.replies.get(), wait)
                    except TimeoutError:
                        break
                    if status == "OK":
                        return cert
                    error = error_from_code(status, message)
                    if status not in _RETRY_CODES:
                        raise error
                    last = error  # the registry's own trouble: try again after this wait
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if last is not None:
            raise last
        if self.no_responders:
            raise Unavailable("the registry instance is not listening")
        raise Unavailable(f"the registry did not answer the {self.what} in time")


def open_enrolment(sealed: bytes, box: Any, max_skew: float = 300.0) -> EnrolmentRequest:
    """Open and check an enrolment request sealed to this registry instance.

    Raises:
        DecodeError: not a readable request.
        Unauthenticated: the proof of key possession fails or the request is stale.
    """
    if len(sealed) > MAX_ENROL_FRAME:
        raise DecodeError("enrolment request too large")
    try:
        body = msgpack.unpackb(SealedBox(box).decrypt(sealed), raw=False)
        agent, token = str(body["agent"]), str(body["token"])
        sign_pk, box_pk, ts, sig = body["sign_pk"], body["box_pk"], int(body["ts"]), body["sig"]
    except (
        CryptoError,
        KeyError,
        TypeError,
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise DecodeError(f"unreadable enrolment request ({type(exc).__name__})") from None
    if not all(isinstance(b, bytes) for b in (sign_pk, box_pk, sig)) or len(box_pk) != 32:
        raise DecodeError("enrolment request keys must be binary")
    validate_name("agent", agent)
    if abs(time.time() * 1000 - ts) > max_skew * 1000:
        raise Unauthenticated("enrolment request is stale")
    try:
        VerifyKey(sign_pk).verify(_proof_bytes(agent, token, sign_pk, box_pk, ts), sig)
    except (BadSignatureError, ValueError):
        raise Unauthenticated("enrolment request does not prove possession of its key") from None
    return EnrolmentRequest(agent=agent, token=token, sign_pk=sign_pk, box_pk=box_pk)


class TokenIndex:
    """The keys of the stored join tokens, so that a request naming an unknown token costs no
    JetStream round trip.

    A miss is only certain after a re-read that started after the request arrived; re-reads
    happen at most every ``refresh`` seconds, and a miss in between is ``None`` ("not sure":
    the registry drops the request and the agent's retry finds the token).

    Args:
        load: reads the stored token keys.
        refresh: the least seconds between two re-reads.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[set[str]]],
        refresh: float = TOKEN_INDEX_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._refresh = refresh
        self._clock = clock
        self._keys: set[str] = set()
        self._next = -math.inf

    async def known(self, key: str) -> bool | None:
        """``True``: stored (worth a lookup); ``False``: certainly not; ``None``: not sure."""
        if key in self._keys:
            return True
        now = self._clock()
        if now < self._next:
            return None
        self._next = now + self._refresh
        try:
            self._keys = await self._load()
        except MeshError:
            return None
        return key in self._keys


class _EnrolmentServer:
    """The registry instance's side, one request at a time (a NATS subscription's callbacks
    run in order), cheapest checks first."""

    def __init__(
        self, mesh: MeshHandle, issue: Callable[[EnrolmentRequest], Awaitable[bytes]]
    ) -> None:
        self.mesh = mesh
        self.issue = issue
        self.box = mesh.identity.keys.box
        self.prefix = f"{mesh.config.prefix}."
        self.open_budget = TokenBucket(ENROL_OPEN_RATE, ENROL_OPEN_BURST)
        self.issue_budget = TokenBucket(ENROL_ISSUE_RATE, ENROL_ISSUE_BURST)
        self.tokens = TokenIndex(mesh.control.token_keys)
        self.replies: OrderedDict[bytes, bytes] = OrderedDict()

    async def _send(self, reply: str, payload: bytes) -> None:
        with contextlib.suppress(MeshError):
            await self.mesh.transport.publish(reply, payload)

    def _sign(self, request: bytes, status: str, message: str = "", cert: bytes = b"") -> bytes:
        return sign_reply(self.mesh.identity.keys.signing, request, status, message, cert)

    async def on_request(self, msg: InboundMessage) -> None:
        if not msg.reply or msg.reply.startswith(self.prefix):
            return  # never answer into the mesh's own subjects
        if not MIN_ENROL_FRAME < len(msg.data) <= MAX_ENROL_FRAME:
            return
        digest = hashlib.sha256(msg.data).digest()
        cached = self.replies.get(digest)
        if cached is not None:  # a replay (or a resend through the broker): the same answer
            await self._send(msg.reply, cached)
            return
        if not self.open_budget.try_take():
            return  # a flood of sealed boxes: bounded CPU; the agent's retry comes later
        try:
            request = open_enrolment(msg.data, self.box)
        except Unauthenticated as exc:  # stale or no proof: cheap to answer, and useful
            await self._send(msg.reply, self._sign(digest, exc.code, exc.message))
            return
        except MeshError:
            return  # junk, or not for this instance: no answer, no more work
        known = await self.tokens.known(ControlStore.token_key(request.token))
        if known is None:
            return  # maybe a token made since the last re-read: the retry will tell
        if not known:
            await self._send(msg.reply, self._sign(digest, "UNAUTHENTICATED", "unknown join token"))
            return
        if not self.issue_budget.try_take():
            return  # a real token's holder sends faster than this: it retries
        try:
            out = self._sign(digest, "OK", cert=await self.issue(request))
        except MeshError as exc:
            out = self._sign(digest, exc.code, exc.message)
        except Exception:  # never leak internals to an unauthenticated party
            out = self._sign(digest, Internal.code, "enrolment failed")
        self.replies[digest] = out
        while len(self.replies) > REPLY_CACHE_SIZE:
            self.replies.popitem(last=False)
        await self._send(msg.reply, out)


async def serve_enrolment(
    mesh: MeshHandle, issue: Callable[[EnrolmentRequest], Awaitable[bytes]]
) -> None:
    """Answer enrolment requests addressed to this registry instance.

    Args:
        mesh: the registry's ``Mesh``; its box key opens the requests, its signing key signs
            the replies.
        issue: checks the token and returns the new certificate's wire bytes (the same bytes
            again for a retry by the same keys); raises a ``MeshError`` to refuse.
    """
    if REGISTRY_ROLE not in mesh.identity.certificate.roles:
        raise PermissionDenied("serving enrolment needs an identity with the registry role")
    server = _EnrolmentServer(mesh, issue)
    await mesh.subscribe_raw(enrol_subject(mesh.config.prefix, mesh.instance), server.on_request)
