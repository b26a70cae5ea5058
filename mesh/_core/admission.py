"""Admission: whether a decoded frame may go further, cheapest rejection first.

One function per message kind, each the normative order of ``docs/protocol.md`` (section 11
for requests, section 14 for events). They raise the ``MeshError`` to refuse with and return
what the next stages need; nothing here touches the network, so the order can be tested
without a broker. The replay guard is checked early and recorded once the seal or
signature verified (steps 5 and 12), or when the rate-limit peek refuses a request whose
certificate verified (step 10), with no await in between: every refusal the caller can be
told about and that a later copy of the frame could pass leaves the id recorded.

A refusal made once the caller's certificate verified and the pair key is known (the peek,
step 10) is raised as ``SealedRefusal``: the callee answers it with a sealed error reply, which
the caller may act on; every other refusal here is answered unsealed, a hint only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mesh._core.crypto import UNVERIFIED, PairKeys, ReplayGuard, open_frame, verify_frame
from mesh._core.envelope import (
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    Header,
    Kind,
    check_trace_context,
)
from mesh._core.identity import Certificate, CertificateVerifier
from mesh.errors import (
    DeadlineExceeded,
    DecodeError,
    MeshError,
    MessageTooLarge,
    ResourceExhausted,
    Unauthenticated,
)

__all__ = ["SealedRefusal", "admit_event", "admit_request", "too_large"]

_NO_HEADERS: Mapping[str, str] = {}


class SealedRefusal(Exception):
    """A refusal of a request whose sender's certificate verified: answered sealed.

    Attributes:
        error: the refusal (``ResourceExhausted`` of the rate-limit peek).
        key: the pair key with the caller, to seal the answer with.
    """

    def __init__(self, error: MeshError, key: bytes) -> None:
        super().__init__(error.message)
        self.error = error
        self.key = key


def too_large(size: int) -> MessageTooLarge:
    """The refusal of a body over this agent's limit."""
    return MessageTooLarge(f"a body of {size} bytes exceeds the limit of this agent")


def admit_request(
    hdr: Header,
    end: int,
    data: bytes,
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    agent: str,
    instance: str,
    now_ms: float,
    max_sealed: int,
    replay: ReplayGuard,
    verifier: CertificateVerifier,
    pair: PairKeys,
    peek: Callable[[str, str], None],
) -> tuple[Certificate, bytes, bytes]:
    """Steps 2 to 12 of request processing (``docs/protocol.md`` section 11).

    Args:
        hdr / end: the decoded header and where the sealed body starts (step 1).
        data / subject / headers: the NATS message.
        agent / instance: who this instance is.
        now_ms: the callee's clock, unix milliseconds.
        max_sealed: the largest sealed body accepted (``max_body`` + nonce + tag).
        replay: this instance's replay guard.
        verifier: certificate verification (cached; trust root, expiry, revocation).
        pair: the pair-key cache of this instance's box key.
        peek: the rate-limit peek for (caller agent, endpoint); raises ``ResourceExhausted``
            (the id is then recorded: a copy sent once the bucket refilled is a replay, so a
            sealed refusal is the truth about that frame).

    Returns:
        ``(caller certificate, pair key, plaintext body)``.

    Raises:
        DeadlineExceeded: the request expired on the way (step 6: dropped, not answered).
        SealedRefusal: the rate-limit peek refused (step 10), with the pair key to seal it.
        MeshError: the refusal of the first step that failed (answered unsealed).
    """
    if len(data) - end > max_sealed:  # 2
        raise too_large(len(data) - end)
    if hdr.kind != Kind.REQUEST:  # 3
        raise DecodeError(f"expected a request frame, got kind {hdr.kind}")
    if hdr.to_agent != agent or hdr.to_instance != instance:  # 4
        raise Unauthenticated(
            f"request addressed to {hdr.to_agent}.{hdr.to_instance}, this is {agent}.{instance}"
        )
    if subject.rpartition(".")[2] != hdr.name:
        raise Unauthenticated("subject does not match the sealed endpoint")
    sender = (hdr.from_agent, hdr.from_instance)
    replay.check(hdr.id, hdr.ts, sender)  # 5
    deadline = hdr.deadline
    assert deadline is not None  # required for requests by decode_frame
    if deadline <= now_ms:  # 6
        raise DeadlineExceeded("request deadline passed before it arrived")
    if hdr.traceparent is not None or hdr.tracestate is not None:  # 7
        check_trace_context(hdr.traceparent, hdr.tracestate)
    readable = headers or _NO_HEADERS
    if (
        readable.get(HDR_DEADLINE) != str(deadline)
        or readable.get(HDR_TRACEPARENT) != hdr.traceparent
        or readable.get(HDR_TRACESTATE) != hdr.tracestate
    ):
        raise Unauthenticated("readable NATS headers differ from the sealed header")
    assert hdr.cert is not None
    cert = verifier.verify(hdr.cert)  # 8
    if cert.agent != hdr.from_agent or cert.instance != hdr.from_instance:  # 9
        raise Unauthenticated("sender does not match its certificate")
    try:
        peek(cert.agent, hdr.name or "")  # 10
    except ResourceExhausted as exc:
        # The caller is told to come back later, so this frame must not pass then. Recording
        # an id whose seal is unopened blocks only copies of this frame (ids are 128 random
        # bits); as the sender is not verified, its eviction raises no floor (section 15).
        replay.record(hdr.id, hdr.ts, UNVERIFIED)
        # Sealed to the certificate's key: only its holder can read it, and what it says
        # (this id will not be served) is true whoever sent the frame.
        raise SealedRefusal(exc, pair.get(cert.box_pk)) from None
    key = pair.get(cert.box_pk)  # 11
    plaintext = open_frame(key, data, end)
    replay.record(hdr.id, hdr.ts, sender)  # 12
    return cert, key, plaintext


def admit_event(
    hdr: Header,
    end: int,
    data: bytes,
    subject: str,
    headers: Mapping[str, str] | None,
    *,
    expected_subject: str,
    max_signed: int,
    replay: ReplayGuard,
    verifier: CertificateVerifier,
    prefix: str,
) -> tuple[Certificate, bytes]:
    """Event processing (``docs/protocol.md`` section 14), after the frame decoded.

    Args:
        expected_subject: the subject the signed header names (``<p>.evt.<fa>.<ep>``).
        max_signed: the largest body plus signature accepted.
        prefix: this mesh's subject prefix, which the signature covers (section 8).

    Returns:
        ``(publisher certificate, signed bytes)``; the body is ``signed[end:]``.

    Raises:
        MeshError: the reason the event is dropped.
    """
    if len(data) - end > max_signed:
        raise too_large(len(data) - end)
    if hdr.kind != Kind.EVENT:
        raise DecodeError("expected an event frame")
    if subject != expected_subject:
        raise Unauthenticated("event subject does not match its signed header")
    sender = (hdr.from_agent, hdr.from_instance)
    replay.check(hdr.id, hdr.ts, sender)
    readable = headers or _NO_HEADERS
    if (
        readable.get(HDR_TRACEPARENT) != hdr.traceparent
        or readable.get(HDR_TRACESTATE) != hdr.tracestate
    ):
        raise Unauthenticated("readable trace headers differ from the signed ones")
    assert hdr.cert is not None
    cert = verifier.verify(hdr.cert)
    if cert.agent != hdr.from_agent or cert.instance != hdr.from_instance:
        raise Unauthenticated("sender does not match its certificate")
    signed = verify_frame(cert.sign_pk, data, prefix)
    replay.record(hdr.id, hdr.ts, sender)
    return cert, signed
