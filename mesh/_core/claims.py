"""Idempotency claims: the signed record that makes a keyed call run once across instances
(``docs/protocol.md`` section 17, "Claims").

A claim is a signed document (``mesh._core.signed``) in the bucket ``<prefix>-claims`` under
``claim_key(agent, caller, endpoint, ik)``, written by the instance that runs the handler:

- ``running`` before the handler starts (a compare-and-set create: one instance wins);
- ``done`` with the outcome after it (an update at the revision it created);
- ``aborted`` when the handler was cancelled while running (it may have run in part);
- ``released`` when the handler never started (another instance may take the claim over).

The broker reads every record, so nothing secret is in clear: the request's fingerprint and
the outcome are sealed under a random content key, and that key is wrapped once for every
instance of the agent the writer knew (and itself) under a key derived from their pair key
(section 6). Another instance of the agent can re-seal the outcome to the caller; the broker
cannot read it, nor change a record without the signature failing. ``decide`` is what an
instance does with a claim it did not write. Pure core: no I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.signing import SigningKey

from mesh._core.identity import Certificate, CertificateVerifier
from mesh._core.signed import open_document, sign_document, typed_field, verify_document
from mesh.errors import DecodeError, Unauthenticated

__all__ = [
    "CLAIM_VERSION",
    "STATE_ABORTED",
    "STATE_DONE",
    "STATE_RELEASED",
    "STATE_RUNNING",
    "Claim",
    "ClaimSecret",
    "Decision",
    "Outcome",
    "Verdict",
    "claim_wrap_key",
    "decide",
    "decode_claim",
    "encode_claim",
    "new_content_key",
    "open_secret",
    "seal_secret",
    "unwrap_content_key",
    "wrap_content_key",
]

CLAIM_VERSION = 1
STATE_RUNNING = "running"
STATE_DONE = "done"
STATE_ABORTED = "aborted"
STATE_RELEASED = "released"
STATES = frozenset({STATE_RUNNING, STATE_DONE, STATE_ABORTED, STATE_RELEASED})

_PERSON = b"mesh-claim-v1"
_NONCE = 24
_KEY = 32
_ID = 16
_WHAT = "idempotency claim"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the first execution answered: a status and the reply body (``None``: the body
    was too large to keep in the claim, only the status is known)."""

    status: str
    body: bytes | None


@dataclass(frozen=True, slots=True)
class ClaimSecret:
    """The sealed part of a claim: the request's fingerprint and, once done, the outcome."""

    fingerprint: bytes
    outcome: Outcome | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A verified claim record.

    Attributes:
        key: the key-value key it is filed under (signed: it cannot be moved to another).
        certificate: the writer's, verified.
        run: the writer's incarnation (random per process): tells a restarted instance with the
            same identity from the one that wrote the claim.
        nonce: random per claim: the writer recognises its own create after a lost ack.
        ts: signing time, unix seconds.
        deadline: the claiming request's deadline, unix seconds: its handler is cancelled then.
        state: ``running``, ``done``, ``aborted`` or ``released``.
        wraps: the content key wrapped for each instance id that can open ``box``.
        box: the sealed ``ClaimSecret``.
    """

    key: str
    certificate: Certificate
    run: bytes
    nonce: bytes
    ts: float
    deadline: float
    state: str
    wraps: dict[str, bytes]
    box: bytes

    @property
    def owner(self) -> str:
        """The writer's directory key, ``<agent>.<instance>``."""
        return f"{self.certificate.agent}.{self.certificate.instance}"


def new_content_key() -> bytes:
    """A fresh random content key for one claim."""
    return os.urandom(_KEY)


def claim_wrap_key(pair_key: bytes) -> bytes:
    """The key wrapping content keys between two instances: BLAKE2b-256 of their pair key
    (section 6) with its own personalization, so that no frame sealed under the pair key can
    pass for a wrapped key or the reverse."""
    return blake2b(pair_key, digest_size=_KEY, person=_PERSON, encoder=RawEncoder)


def _seal(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def _open(key: bytes, aad: bytes, sealed: bytes) -> bytes | None:
    if len(sealed) < _NONCE + 16:
        return None
    try:
        out: bytes = crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[_NONCE:], aad, sealed[:_NONCE], key
        )
    except CryptoError:
        return None
    return out


def wrap_content_key(wrap_key: bytes, content_key: bytes, key: str, reader: str) -> bytes:
    """``content_key`` sealed for the instance ``reader`` (72 bytes)."""
    return _seal(wrap_key, _PERSON + key.encode() + b"\0" + reader.encode(), content_key)


def unwrap_content_key(wrap_key: bytes, wrapped: bytes, key: str, reader: str) -> bytes | None:
    """The content key, or ``None`` if it was not wrapped with ``wrap_key`` for ``reader``."""
    out = _open(wrap_key, _PERSON + key.encode() + b"\0" + reader.encode(), wrapped)
    return out if out is not None and len(out) == _KEY else None


def seal_secret(content_key: bytes, key: str, secret: ClaimSecret) -> bytes:
    """The ``box`` of a claim."""
    plain: dict[str, Any] = {"fp": secret.fingerprint}
    if secret.outcome is not None:
        plain["st"] = secret.outcome.status
        if secret.outcome.body is not None:
            plain["body"] = secret.outcome.body
    return _seal(content_key, _PERSON + key.encode(), msgpack.packb(plain, use_bin_type=True))


def open_secret(content_key: bytes, key: str, box: bytes) -> ClaimSecret | None:
    """Open a claim's ``box``; ``None`` if it does not open or is malformed."""
    raw = _open(content_key, _PERSON + key.encode(), box)
    if raw is None:
        return None
    try:
        plain = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises many types on junk
        return None
    if not isinstance(plain, dict) or not isinstance(plain.get("fp"), bytes):
        return None
    status, body = plain.get("st"), plain.get("body")
    if status is None:
        return ClaimSecret(plain["fp"])
    if not isinstance(status, str) or (body is not None and not isinstance(body, bytes)):
        return None
    return ClaimSecret(plain["fp"], Outcome(status, body))


def encode_claim(
    signing: SigningKey,
    cert: Certificate,
    *,
    key: str,
    run: bytes,
    nonce: bytes,
    ts: float,
    deadline: float,
    state: str,
    wraps: dict[str, bytes],
    box: bytes,
) -> bytes:
    """Sign a claim record with the writer's instance key: ``msgpack([body, signature])``."""
    body: dict[str, Any] = {
        "v": CLAIM_VERSION,
        "key": key,
        "cert": cert.raw,
        "run": run,
        "nonce": nonce,
        "ts": round(ts * 1000),
        "dl": round(deadline * 1000),
        "state": state,
        "keys": wraps,
        "box": box,
    }
    return sign_document(body, lambda packed: signing.sign(packed).signature)


def decode_claim(
    raw: bytes,
    verifier: CertificateVerifier,
    *,
    key: str,
    agent: str,
    now: float,
    window: float,
    max_future: float,
) -> Claim:
    """Verify and parse a claim found under ``key`` of the agent ``agent``.

    The writer's certificate must chain to the root and name ``agent`` (only an instance of
    the callee may claim its calls), must not be revoked, and must have been valid when the
    claim was signed; it may have expired since, within ``window`` (a claim outlives a
    renewal). The claim must name ``key`` and be dated within ``window`` and not more than
    ``max_future`` ahead.

    Raises:
        DecodeError: malformed record.
        Unauthenticated: bad certificate or signature, another agent's, misfiled or misdated.
    """
    body, packed, sig = open_document(raw, _WHAT)
    if typed_field(body, "v", int, _WHAT) != CLAIM_VERSION:
        raise DecodeError(f"unsupported {_WHAT} version")
    filed = typed_field(body, "key", str, _WHAT)
    cert_raw = typed_field(body, "cert", bytes, _WHAT)
    run = typed_field(body, "run", bytes, _WHAT)
    nonce = typed_field(body, "nonce", bytes, _WHAT)
    ts = typed_field(body, "ts", int, _WHAT) / 1000.0
    deadline = typed_field(body, "dl", int, _WHAT) / 1000.0
    state = typed_field(body, "state", str, _WHAT)
    wraps = typed_field(body, "keys", dict, _WHAT)
    box = typed_field(body, "box", bytes, _WHAT)
    if len(run) != _ID or len(nonce) != _ID or state not in STATES:
        raise DecodeError(f"{_WHAT} has a field out of range")
    if not all(type(k) is str and type(v) is bytes for k, v in wraps.items()):
        raise DecodeError(f"{_WHAT} keys must map instance ids to bytes")
    # Valid when signed, and not revoked now; it may have expired since (the claim lives for
    # ``window``, longer than a certificate between renewals).
    cert, _expired_for = verifier.verify_for_renewal(cert_raw, window)
    verify_document(packed, sig, cert.sign_pk, f"{_WHAT} {key} is forged")
    if cert.agent != agent:
        raise Unauthenticated(f"{_WHAT} {key} was written by agent {cert.agent!r}, not {agent!r}")
    if filed != key:
        raise Unauthenticated(f"{_WHAT} filed under {key} names {filed}")
    if not (cert.not_before <= ts < cert.not_after):
        raise Unauthenticated(f"{_WHAT} {key} was signed outside its certificate's validity")
    if ts > now + max_future or ts < now - window:
        raise Unauthenticated(f"{_WHAT} {key} is dated outside the claim window")
    return Claim(filed, cert, run, nonce, ts, deadline, state, dict(wraps), box)


class Verdict(Enum):
    """What an instance does with a claim it found instead of creating."""

    RUN = "run"  # the claim is this request's own (its create landed, the ack was lost)
    TAKE = "take"  # released: take it over with an update at its revision, then run
    REPLAY = "replay"  # done: answer with the first execution's outcome
    WAIT = "wait"  # still running at a live (or draining) instance: read it again later
    UNKNOWN = "unknown"  # the first execution may have run: an honest error, never a rerun
    CONFLICT = "conflict"  # the key was used for a different request body


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    outcome: Outcome | None = None


def decide(
    claim: Claim,
    secret: ClaimSecret | None,
    *,
    fingerprint: bytes,
    mine: bool,
    owner_gone: bool,
    now: float,
    grace: float,
) -> Decision:
    """What to do with a verified claim written before this request got to it.

    Args:
        claim: the verified record.
        secret: its opened box, or ``None`` if this instance has no wrapped key for it.
        fingerprint: this request's body fingerprint.
        mine: the claim is this very request's (same incarnation and claim nonce).
        owner_gone: signed evidence that the writer will not finish: the directory shows it
            gone and not draining, or it is an earlier incarnation of this instance.
        now: unix seconds.
        grace: how long after the claim's deadline its writer may still record the outcome.
    """
    who = f"instance {claim.certificate.instance}"
    if mine and claim.state == STATE_RUNNING:
        return Decision(Verdict.RUN)
    if claim.state == STATE_RELEASED:
        return Decision(Verdict.TAKE)  # never started: whatever the body, nothing ran
    if secret is None:
        return Decision(
            Verdict.UNKNOWN, f"{who} claimed it and sealed its record for other instances"
        )
    if secret.fingerprint != fingerprint:
        return Decision(Verdict.CONFLICT)
    if claim.state == STATE_DONE:
        outcome = secret.outcome
        if outcome is None:
            return Decision(Verdict.UNKNOWN, f"{who} recorded no outcome in its done claim")
        if outcome.body is None:
            return Decision(
                Verdict.UNKNOWN,
                f"{who} ran it (status {outcome.status}); its reply was too large to keep",
            )
        return Decision(Verdict.REPLAY, outcome=outcome)
    if claim.state == STATE_ABORTED:
        return Decision(Verdict.UNKNOWN, f"{who} was stopped while running it")
    if owner_gone:
        return Decision(Verdict.UNKNOWN, f"{who} claimed it and is gone without an outcome")
    if now > claim.deadline + grace:
        return Decision(Verdict.UNKNOWN, f"{who} recorded no outcome by the first deadline")
    return Decision(Verdict.WAIT)
