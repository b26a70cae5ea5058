"""Every refusal of request and event admission, in its step of ``docs/protocol.md`` §11 and
§14, fed the input it refuses and checked for its type and message."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from mesh._core.admission import SealedRefusal, admit_event, admit_request, too_large
from mesh._core.crypto import PairKeys, ReplayGuard, derive_pair_key, seal_frame, sign_frame
from mesh._core.envelope import (
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    Header,
    Kind,
    decode_frame,
    encode_frame,
    request_header,
)
from mesh._core.identity import CertificateVerifier
from mesh.errors import (
    DeadlineExceeded,
    DecodeError,
    InvalidArgument,
    MessageTooLarge,
    ResourceExhausted,
    Unauthenticated,
)
from mesh.testing import Trust

TRUST = Trust()
ALICE, BOB = TRUST.identity("alice"), TRUST.identity("bob")
MALLORY = TRUST.identity("mallory")
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BODY = b'{"text":"hi"}'


def _open(caller: str, endpoint: str) -> None:
    return None


def _request(
    *,
    to: tuple[str, str] = (BOB.agent, BOB.instance),
    sender: tuple[str, str] = (ALICE.agent, ALICE.instance),
    cert: bytes = ALICE.certificate.raw,
    deadline_s: float = 10,
    traceparent: str | None = None,
    tracestate: str | None = None,
    body: bytes = BODY,
) -> tuple[bytes, dict[str, str]]:
    deadline = int((time.time() + deadline_s) * 1000)
    aad = request_header(
        os.urandom(16), int(time.time() * 1000), sender[0], sender[1], to[0], to[1], "echo",
        deadline, 1, cert, None, traceparent, tracestate,
    )  # fmt: skip
    key = derive_pair_key(ALICE.keys.box, BOB.certificate.box_pk)
    headers = {HDR_DEADLINE: str(deadline)}
    if traceparent is not None:
        headers[HDR_TRACEPARENT] = traceparent
    if tracestate is not None:
        headers[HDR_TRACESTATE] = tracestate
    return seal_frame(key, aad, body), headers


def _admit(
    frame: bytes,
    headers: dict[str, str] | None,
    *,
    guard: ReplayGuard | None = None,
    subject: str | None = None,
    max_sealed: int = 1 << 20,
    peek: Callable[[str, str], None] = _open,
    now_ms: float | None = None,
) -> tuple[Any, bytes, bytes]:
    hdr, end = decode_frame(frame)
    return admit_request(
        hdr, end, frame, subject or f"mesh.rpc.bob.{BOB.instance}.echo", headers,
        agent=BOB.agent, instance=BOB.instance,
        now_ms=time.time() * 1000 if now_ms is None else now_ms, max_sealed=max_sealed,
        replay=ReplayGuard() if guard is None else guard,
        verifier=CertificateVerifier(BOB.root_public_key), pair=PairKeys(BOB.keys.box), peek=peek,
    )  # fmt: skip


class TestRequest:
    def test_admitted(self) -> None:
        """A good request gives the caller's certificate, the pair key and the plaintext, and
        its id is recorded."""
        frame, headers = _request()
        guard = ReplayGuard()

        cert, key, plaintext = _admit(frame, headers, guard=guard)

        assert (cert.agent, plaintext) == ("alice", BODY)
        assert key == derive_pair_key(BOB.keys.box, ALICE.certificate.box_pk)
        assert len(guard) == 1

    def test_body_at_the_limit_admitted(self) -> None:
        """A sealed body of exactly max_sealed bytes is admitted; one more is refused."""
        frame, headers = _request()
        sealed = len(frame) - decode_frame(frame)[1]

        assert _admit(frame, headers, max_sealed=sealed)[2] == BODY
        with pytest.raises(MessageTooLarge, match=rf"a body of {sealed} bytes exceeds the limit"):
            _admit(frame, headers, max_sealed=sealed - 1)

    def test_not_a_request(self) -> None:
        """A frame of another kind on the request subject is a DecodeError naming the kind."""
        header = Header(
            kind=Kind.REPLY, id=os.urandom(16), ts=1, from_agent="a", from_instance="i",
            to_agent=BOB.agent, to_instance=BOB.instance, reply_to=bytes(16), status="OK",
        )  # fmt: skip
        with pytest.raises(DecodeError, match=r"expected a request frame, got kind 2$"):
            admit_request(
                header, 0, b"", "s.echo", None, agent=BOB.agent, instance=BOB.instance,
                now_ms=0, max_sealed=10, replay=ReplayGuard(),
                verifier=CertificateVerifier(BOB.root_public_key), pair=PairKeys(BOB.keys.box),
                peek=_open,
            )  # fmt: skip

    @pytest.mark.parametrize("to", [("carol", "x"), ("bob", "other"), ("carol", None)])
    def test_addressed_elsewhere(self, to: tuple[str, str | None]) -> None:
        """A request for another agent or another instance is refused naming both."""
        target = (to[0], to[1] or BOB.instance)
        frame, headers = _request(to=target)

        with pytest.raises(Unauthenticated, match=rf"request addressed to {target[0]}.{target[1]}"):
            _admit(frame, headers)

    def test_subject_names_another_endpoint(self) -> None:
        """A subject whose last token is not the sealed endpoint is refused."""
        frame, headers = _request()

        with pytest.raises(Unauthenticated, match=r"subject does not match the sealed endpoint$"):
            _admit(frame, headers, subject=f"mesh.rpc.bob.{BOB.instance}.other")

    def test_deadline_passed(self) -> None:
        """A request whose deadline is now or past is DeadlineExceeded; a ms before, admitted."""
        frame, headers = _request()
        deadline = decode_frame(frame)[0].deadline
        assert deadline is not None

        with pytest.raises(DeadlineExceeded, match=r"request deadline passed before it arrived$"):
            _admit(frame, headers, now_ms=deadline)
        assert _admit(frame, headers, now_ms=deadline - 1)[2] == BODY

    def test_bad_trace_context_refused(self) -> None:
        """A sealed traceparent outside the W3C grammar is refused, as is a bad tracestate
        alone."""
        frame, headers = _request(traceparent="junk")
        with pytest.raises(InvalidArgument, match=r"is not a W3C traceparent$"):
            _admit(frame, headers)
        frame, headers = _request(tracestate=" bad")
        with pytest.raises(InvalidArgument, match="tracestate must be"):
            _admit(frame, headers)

    def test_trace_context_admitted(self) -> None:
        """Good trace context, copied into the readable headers, is admitted."""
        frame, headers = _request(traceparent=TP, tracestate="a=b")

        assert _admit(frame, headers)[2] == BODY

    @pytest.mark.parametrize("header", [HDR_DEADLINE, HDR_TRACEPARENT, HDR_TRACESTATE])
    def test_readable_header_differs(self, header: str) -> None:
        """A readable NATS header that differs from the sealed one is refused."""
        frame, headers = _request(traceparent=TP, tracestate="a=b")
        headers[header] = headers[header] + "0"

        with pytest.raises(Unauthenticated, match="readable NATS headers differ from the sealed"):
            _admit(frame, headers)

    def test_no_readable_headers(self) -> None:
        """A request with no NATS headers at all lacks the readable deadline: refused."""
        frame, _ = _request()

        with pytest.raises(Unauthenticated, match="readable NATS headers differ"):
            _admit(frame, None)

    @pytest.mark.parametrize("sender", [("eve", None), (None, "other-instance")])
    def test_sender_not_its_certificate(self, sender: tuple[str | None, str | None]) -> None:
        """A header naming another agent or instance than its certificate is refused."""
        claimed = (sender[0] or ALICE.agent, sender[1] or ALICE.instance)
        frame, headers = _request(sender=claimed)

        with pytest.raises(Unauthenticated, match=r"sender does not match its certificate$"):
            _admit(frame, headers)

    def test_peek_refusal_is_sealed(self) -> None:
        """A rate-limit peek refusal is a SealedRefusal whose message is the refusal's."""

        def full(caller: str, endpoint: str) -> None:
            assert (caller, endpoint) == ("alice", "echo")
            raise ResourceExhausted("rate limit exceeded for alice", retry_after=1.0)

        frame, headers = _request()
        with pytest.raises(SealedRefusal, match=r"rate limit exceeded for alice$"):
            _admit(frame, headers, peek=full)


def test_too_large_message() -> None:
    """The refusal of a large body gives its size."""
    error = too_large(123)

    assert isinstance(error, MessageTooLarge)
    assert error.message == "a body of 123 bytes exceeds the limit of this agent"


def _event(
    *,
    sender: tuple[str, str] = (ALICE.agent, ALICE.instance),
    traceparent: str | None = None,
    signer: Any = ALICE,
) -> tuple[bytes, dict[str, str]]:
    header = Header(
        kind=Kind.EVENT, id=os.urandom(16), ts=int(time.time() * 1000), from_agent=sender[0],
        from_instance=sender[1], name="news", cert=ALICE.certificate.raw, traceparent=traceparent,
    )  # fmt: skip
    frame, _ = encode_frame(header, b'{"n":1}')
    headers = {} if traceparent is None else {HDR_TRACEPARENT: traceparent}
    return frame + sign_frame(signer.keys.signing, frame, "mesh"), headers


def _admit_event(
    frame: bytes,
    headers: dict[str, str] | None,
    *,
    guard: ReplayGuard | None = None,
    subject: str = "mesh.evt.alice.news",
    max_signed: int = 1 << 20,
) -> tuple[Any, bytes]:
    hdr, end = decode_frame(frame)
    return admit_event(
        hdr, end, frame, subject, headers, expected_subject="mesh.evt.alice.news",
        max_signed=max_signed, replay=ReplayGuard() if guard is None else guard,
        verifier=CertificateVerifier(ALICE.root_public_key), prefix="mesh",
    )  # fmt: skip


class TestEvent:
    def test_admitted_and_recorded(self) -> None:
        """A good event gives its publisher and signed bytes, and a copy is a replay."""
        frame, headers = _event(traceparent=TP)
        guard = ReplayGuard()

        cert, signed = _admit_event(frame, headers, guard=guard)

        assert cert.agent == "alice"
        assert signed == frame[:-64]
        with pytest.raises(Unauthenticated, match=r"replayed message id$"):
            _admit_event(frame, headers, guard=guard)

    def test_body_at_the_limit(self) -> None:
        """Body and signature of exactly max_signed bytes are admitted; one more is refused."""
        frame, headers = _event()
        size = len(frame) - decode_frame(frame)[1]

        assert _admit_event(frame, headers, max_signed=size)[0].agent == "alice"
        with pytest.raises(MessageTooLarge, match=rf"a body of {size} bytes"):
            _admit_event(frame, headers, max_signed=size - 1)

    def test_not_an_event(self) -> None:
        """A request frame on an event subject is a DecodeError."""
        frame, _ = _request()

        with pytest.raises(DecodeError, match=r"expected an event frame$"):
            _admit_event(frame, {})

    def test_other_subject(self) -> None:
        """An event published on another subject than its header names is refused."""
        frame, headers = _event()

        with pytest.raises(Unauthenticated, match="event subject does not match its signed"):
            _admit_event(frame, headers, subject="mesh.evt.alice.other")

    def test_replay_checked_before_the_signature(self) -> None:
        """A seen id is refused as a replay before anything else is checked."""
        frame, headers = _event()
        guard = ReplayGuard()
        _admit_event(frame, headers, guard=guard)

        with pytest.raises(Unauthenticated, match=r"replayed message id$"):
            _admit_event(frame, {HDR_TRACEPARENT: TP}, guard=guard)

    @pytest.mark.parametrize("readable", [{HDR_TRACEPARENT: TP}, {HDR_TRACESTATE: "a=b"}])
    def test_readable_trace_headers_differ(self, readable: dict[str, str]) -> None:
        """Readable trace headers that the signed header does not carry are refused."""
        frame, _ = _event()

        with pytest.raises(Unauthenticated, match="readable trace headers differ from the signed"):
            _admit_event(frame, readable)

    @pytest.mark.parametrize("sender", [("eve", None), (None, "other-instance")])
    def test_sender_not_its_certificate(self, sender: tuple[str | None, str | None]) -> None:
        """An event naming another agent or instance than its certificate is refused."""
        claimed = (sender[0] or ALICE.agent, sender[1] or ALICE.instance)
        frame, headers = _event(sender=claimed)

        with pytest.raises(Unauthenticated, match=r"sender does not match its certificate$"):
            _admit_event(frame, headers)

    def test_forged_signature_records_nothing(self) -> None:
        """An event signed by another key is refused, and its id is not recorded."""
        frame, headers = _event(signer=MALLORY)
        guard = ReplayGuard()

        with pytest.raises(Unauthenticated, match=r"event signature does not verify$"):
            _admit_event(frame, headers, guard=guard)
        assert len(guard) == 0
