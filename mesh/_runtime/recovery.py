"""Grace renewal: an instance whose certificate expired (the registry was away through its
whole renewal window) gets a new one with no operator, by proving it still holds the key.

An expired certificate is refused by every ordinary check (``CertificateVerifier.verify``, on
every request, event and directory record), so this cannot be a mesh request. Like enrolment
it is a sealed box for one registry instance's box key, sent to
``<prefix>.ctl.registry.<instance>.renew``. Its plaintext holds the old certificate, the
registry instance it is for, a timestamp and a random nonce, signed by the certificate's own
Ed25519 key: only the holder of that key can make one, and only for that registry instance
and mesh prefix.

The broker may replay or rewrite anything, so the registry instance takes a request only
once (nonce), only while its timestamp is within the replay window and not before the
instance started (the nonces are in memory), and only within ``Timeouts.renewal_grace`` of the
certificate's expiry; the registry agent then refuses revoked identities, keeps the agent
name, instance, roles and keys, and audits every grace renewal. Replies are signed by the
registry instance over the SHA-256 of the request, as for enrolment (under their own
context), and the agent drops anything else.

See ``docs/protocol.md``, Certificate renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import VerifyKey

from mesh._core.identity import Certificate, CertificateVerifier, Identity
from mesh._core.names import grace_renew_subject
from mesh._core.ratelimit import TokenBucket
from mesh._log import get_logger
from mesh._runtime.enrol import (
    MIN_ENROL_FRAME,
    REGISTRY_AGENT,
    REGISTRY_ROLE,
    _Exchange,
    sign_reply,
)
from mesh._runtime.ports import MeshHandle
from mesh._transport.base import InboundMessage
from mesh.errors import (
    DecodeError,
    Internal,
    MeshError,
    PermissionDenied,
    Unauthenticated,
)

__all__ = [
    "GraceRenewal",
    "NonceGuard",
    "check_grace_request",
    "grace_request",
    "open_grace_request",
    "renew_in_grace",
    "serve_grace_renewal",
]

log = get_logger(__name__)

_CONTEXT = b"mesh-renew-grace-v1"
_REPLY_CONTEXT = b"mesh-renew-grace-reply-v1"
NONCE_LEN = 16
MAX_GRACE_FRAME = 4096
# Sealed boxes a registry instance opens per second for grace renewals (each costs an X25519
# and up to two Ed25519 verifications); expired agents are few, and retry with backoff.
GRACE_OPEN_RATE, GRACE_OPEN_BURST = 100.0, 100
NONCE_CACHE = 10_000  # accepted nonces kept per registry instance (a floor covers evictions)


class Replayed(Unauthenticated):
    """A grace renewal request whose nonce was already accepted: dropped, never answered."""


@dataclass(frozen=True, slots=True)
class GraceRenewal:
    """A grace renewal request the registry instance verified.

    Attributes:
        certificate: the old certificate: signed by the root, not revoked in the registry's
            head, expired for less than the grace; its key signed the request.
        expired_for: seconds past its ``not_after`` when checked (``0.0``: not yet expired,
            e.g. the agent's clock is ahead).
        grace: the grace the registry instance applied, in seconds.
    """

    certificate: Certificate
    expired_for: float
    grace: float


@dataclass(frozen=True, slots=True)
class _Opened:
    certificate: bytes
    registry: str
    ts: int
    nonce: bytes
    sig: bytes


def proof_bytes(prefix: str, registry: str, certificate: bytes, ts: int, nonce: bytes) -> bytes:
    """What the old certificate's key signs: the request bound to a mesh, a registry
    instance, a time and a nonce."""
    return msgpack.packb([_CONTEXT, prefix, registry, certificate, ts, nonce], use_bin_type=True)


def grace_request(
    identity: Identity, prefix: str, registry: str, now: float | None = None
) -> dict[str, Any]:
    """The plaintext of a grace renewal request (fresh ``ts`` and nonce each call).

    Args:
        identity: the instance's keys and its (expired) certificate.
        prefix: the mesh's subject prefix.
        registry: the instance id of the registry instance it is sealed for.
        now: unix seconds (tests).
    """
    ts = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_bytes(NONCE_LEN)
    cert = identity.certificate.raw
    sig = identity.keys.signing.sign(proof_bytes(prefix, registry, cert, ts, nonce)).signature
    return {"certificate": cert, "registry": registry, "ts": ts, "nonce": nonce, "sig": sig}


def open_grace_request(sealed: bytes, box: PrivateKey) -> _Opened:
    """Open a sealed grace renewal request and check its fields' types.

    Raises:
        DecodeError: too large, not sealed for ``box``, or malformed.
    """
    if len(sealed) > MAX_GRACE_FRAME:
        raise DecodeError("grace renewal request too large")
    try:
        body = msgpack.unpackb(SealedBox(box).decrypt(sealed), raw=False)
        opened = _Opened(
            certificate=body["certificate"],
            registry=body["registry"],
            ts=body["ts"],
            nonce=body["nonce"],
            sig=body["sig"],
        )
    except (
        CryptoError,
        KeyError,
        TypeError,
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise DecodeError(f"unreadable grace renewal request ({type(exc).__name__})") from None
    if not (
        isinstance(opened.certificate, bytes)
        and isinstance(opened.registry, str)
        and type(opened.ts) is int
        and isinstance(opened.nonce, bytes)
        and len(opened.nonce) == NONCE_LEN
        and isinstance(opened.sig, bytes)
    ):
        raise DecodeError("malformed grace renewal request")
    return opened


class NonceGuard:
    """Replay protection for grace renewals at one registry instance.

    A request is taken only if its ``ts`` (unix ms) is within ``[now - window, now + future]``,
    not before ``start`` (the nonces of an earlier run are gone) and above the floor, and its
    nonce was not accepted before. Nonces are kept while inside the window, at most
    ``max_entries``; when full the oldest is dropped and the floor rises to its ``ts``, so a
    dropped nonce cannot be replayed either.

    Args:
        window: seconds a request stays acceptable.
        future: seconds a request may be dated ahead (senders' clock skew).
        start: unix seconds; requests dated earlier are refused.
        max_entries: the most nonces kept.
    """

    def __init__(
        self, window: float, future: float, start: float, max_entries: int = NONCE_CACHE
    ) -> None:
        self._window = int(window * 1000)
        self._future = int(future * 1000)
        self._floor = int(start * 1000) - 1
        self._max = max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def check(self, ts: int, nonce: bytes, now: float) -> None:
        """Refuse a request that is out of time or already taken (records nothing).

        Raises:
            Replayed: the nonce was accepted before.
            Unauthenticated: dated too long ago, ahead, or before this instance's start.
        """
        now_ms = int(now * 1000)
        self._expire(now_ms)
        if nonce in self._seen:
            raise Replayed("grace renewal request replayed")
        if ts > now_ms + self._future:
            raise Unauthenticated("grace renewal request is dated in the future (clock skew?)")
        if ts < now_ms - self._window or ts <= self._floor:
            raise Unauthenticated("grace renewal request is stale")

    def record(self, ts: int, nonce: bytes, now: float) -> None:
        """Remember an accepted request's nonce."""
        self._seen[nonce] = ts
        while len(self._seen) > self._max:
            _, old = self._seen.popitem(last=False)
            self._floor = max(self._floor, old)
        self._expire(int(now * 1000))

    def _expire(self, now_ms: int) -> None:
        while self._seen:
            nonce, ts = next(iter(self._seen.items()))
            if ts >= now_ms - self._window:
                break
            del self._seen[nonce]


def check_grace_request(
    opened: _Opened,
    *,
    prefix: str,
    instance: str,
    verifier: CertificateVerifier,
    grace: float,
    guard: NonceGuard,
    now: float | None = None,
) -> GraceRenewal:
    """The registry instance's checks of an opened request, cheapest first; records the
    nonce of a request that passes them all.

    Raises:
        DecodeError: not for this registry instance, or the certificate is malformed.
        Replayed: the nonce was accepted before.
        Unauthenticated: stale or future-dated; the certificate is forged, revoked, not yet
            valid or past the grace (``CertificateError``); the signature is not by its key.
    """
    now = time.time() if now is None else now
    if opened.registry != instance:
        raise DecodeError("grace renewal request for another registry instance")
    guard.check(opened.ts, opened.nonce, now)
    cert, expired_for = verifier.verify_for_renewal(opened.certificate, grace)
    proof = proof_bytes(prefix, instance, opened.certificate, opened.ts, opened.nonce)
    try:
        VerifyKey(cert.sign_pk).verify(proof, opened.sig)
    except (BadSignatureError, ValueError):
        raise Unauthenticated(
            "grace renewal request is not signed by the certificate's key"
        ) from None
    guard.record(opened.ts, opened.nonce, now)
    return GraceRenewal(certificate=cert, expired_for=expired_for, grace=grace)


class _GraceServer:
    """The registry instance's side, one request at a time, cheapest checks first."""

    def __init__(self, mesh: MeshHandle, issue: Callable[[GraceRenewal], Awaitable[bytes]]) -> None:
        self.mesh = mesh
        self.issue = issue
        self.box = mesh.identity.keys.box
        self.prefix = f"{mesh.config.prefix}."
        timeouts = mesh.config.timeouts
        self.grace = timeouts.renewal_grace
        self.guard = NonceGuard(timeouts.replay_window, timeouts.max_future, time.time())
        self.budget = TokenBucket(GRACE_OPEN_RATE, GRACE_OPEN_BURST)
        self.replays = 0

    async def _send(self, reply: str, payload: bytes) -> None:
        with contextlib.suppress(MeshError):
            await self.mesh.transport.publish(reply, payload)

    def _sign(self, request: bytes, status: str, message: str = "", cert: bytes = b"") -> bytes:
        signing = self.mesh.identity.keys.signing
        return sign_reply(signing, request, status, message, cert, _REPLY_CONTEXT)

    async def on_request(self, msg: InboundMessage) -> None:
        if not msg.reply or msg.reply.startswith(self.prefix):
            return  # never answer into the mesh's own subjects
        if not MIN_ENROL_FRAME < len(msg.data) <= MAX_GRACE_FRAME:
            return
        if not self.budget.try_take():
            return  # a flood: bounded CPU; the agent's retry comes later
        digest = hashlib.sha256(msg.data).digest()
        try:
            opened = open_grace_request(msg.data, self.box)
            request = check_grace_request(
                opened,
                prefix=self.mesh.config.prefix,
                instance=self.mesh.instance,
                verifier=self.mesh.verifier,
                grace=self.grace,
                guard=self.guard,
            )
        except Replayed:
            # Silent: the genuine request was answered; an answer to a copy would only race
            # that reply on the agent's inbox.
            self.replays += 1
            log.warning("mesh.grace_renewal_replayed")
            return
        except DecodeError:
            return  # junk, or not for this instance
        except MeshError as exc:
            log.warning("mesh.grace_renewal_refused", error=exc.message)
            await self._send(msg.reply, self._sign(digest, exc.code, exc.message))
            return
        try:
            out = self._sign(digest, "OK", cert=await self.issue(request))
        except MeshError as exc:
            log.warning("mesh.grace_renewal_refused", error=exc.message)
            out = self._sign(digest, exc.code, exc.message)
        except Exception as exc:  # never leak internals to the requester
            log.error("mesh.grace_renewal_failed", error_type=type(exc).__name__)
            out = self._sign(digest, Internal.code, "grace renewal failed")
        await self._send(msg.reply, out)


async def serve_grace_renewal(
    mesh: MeshHandle, issue: Callable[[GraceRenewal], Awaitable[bytes]]
) -> None:
    """Answer grace renewal requests addressed to this registry instance.

    Args:
        mesh: the registry's ``Mesh``; its box key opens the requests, its signing key signs
            the replies; its ``Timeouts.renewal_grace``, ``replay_window`` and ``max_future``
            apply.
        issue: checks what needs the control plane (revocations, rate limit), issues, records
            and audits; returns the new certificate's wire bytes; raises a ``MeshError`` to
            refuse (its code and message are sent, signed).

    Raises:
        PermissionDenied: this identity lacks the registry role.
    """
    if REGISTRY_ROLE not in mesh.identity.certificate.roles:
        raise PermissionDenied("serving grace renewal needs an identity with the registry role")
    server = _GraceServer(mesh, issue)
    await mesh.subscribe_raw(
        grace_renew_subject(mesh.config.prefix, mesh.instance), server.on_request
    )


async def renew_in_grace(mesh: MeshHandle, timeout: float) -> Certificate:
    """Renew this instance's expired certificate through the grace path.

    The registry instance is found in the directory (its certificate holds the registry
    role); the request is sent again with a fresh timestamp and nonce until a signed reply
    arrives or ``timeout`` is over.

    Raises:
        Unauthenticated: refused (past the grace: a new join token is needed; revoked), or the
            registry returned a certificate for other keys, instance or roles.
        Unavailable: no registry answered in time.
        MeshError: another signed refusal (e.g. ``ResourceExhausted``).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    record = await mesh.directory.wait_for(REGISTRY_AGENT, timeout)
    registry = record.certificate
    if REGISTRY_ROLE not in registry.roles:
        raise Unauthenticated("the directory's registry lacks the registry role")
    prefix = mesh.config.prefix
    exchange = _Exchange(
        mesh.transport,
        grace_renew_subject(prefix, record.instance),
        VerifyKey(registry.sign_pk),
        PublicKey(registry.box_pk),
        reply_context=_REPLY_CONTEXT,
        what="grace renewal",
    )
    identity = mesh.identity
    raw = await exchange.run(
        lambda: grace_request(identity, prefix, record.instance), end, loop.time
    )
    new = mesh.verifier.verify(raw)
    old = identity.certificate
    if (new.agent, new.instance, new.roles, new.sign_pk, new.box_pk) != (
        old.agent,
        old.instance,
        old.roles,
        old.sign_pk,
        old.box_pk,
    ):
        raise Unauthenticated("the registry returned a certificate for other keys or roles")
    return new
