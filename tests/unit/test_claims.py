"""Idempotency claims, the pure part: record encoding, sealing of the outcome, decisions."""

from __future__ import annotations

import os
import time

import msgpack
import pytest

from mesh._core.claims import (
    STATE_ABORTED,
    STATE_DONE,
    STATE_RELEASED,
    STATE_RUNNING,
    Claim,
    ClaimSecret,
    Outcome,
    Verdict,
    claim_wrap_key,
    decide,
    decode_claim,
    encode_claim,
    new_content_key,
    open_secret,
    seal_secret,
    unwrap_content_key,
    wrap_content_key,
)
from mesh._core.crypto import derive_pair_key
from mesh._core.identity import CertificateVerifier, Identity
from mesh._core.names import claim_key
from mesh.errors import DecodeError, MeshError, Unauthenticated
from mesh.testing import Trust

KEY = claim_key("ledger", "alice", "charge", "order-1")
FP = b"f" * 64
WINDOW = 86400.0


def _record(ident: Identity, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "key": KEY,
        "run": b"r" * 16,
        "nonce": b"n" * 16,
        "ts": time.time(),
        "deadline": time.time() + 5,
        "state": STATE_RUNNING,
        "wraps": {},
        "box": b"x" * 40,
    }
    fields.update(overrides)
    return encode_claim(ident.keys.signing, ident.certificate, **fields)  # type: ignore[arg-type]


def _decode(trust: Trust, raw: bytes, *, key: str = KEY, agent: str = "ledger") -> Claim:
    verifier = CertificateVerifier(trust.root.public_key)
    return decode_claim(
        raw, verifier, key=key, agent=agent, now=time.time(), window=WINDOW, max_future=5.0
    )


def test_claim_key_hashes_the_idempotency_key_into_one_token() -> None:
    """Any idempotency key becomes a fixed-length hex token; the names stay readable."""
    key = claim_key("ledger", "alice", "charge", "a key with spaces.and*dots>")
    agent, caller, endpoint, digest = key.split(".")
    assert (agent, caller, endpoint) == ("ledger", "alice", "charge")
    assert len(digest) == 32 and all(c in "0123456789abcdef" for c in digest)
    assert claim_key("ledger", "alice", "charge", "k1") != claim_key(
        "ledger", "bob", "charge", "k1"
    )


def test_a_signed_claim_decodes_with_its_fields(trust: Trust) -> None:
    """A claim round-trips: writer, incarnation, nonce, state, deadline."""
    ident = trust.identity("ledger")
    deadline = time.time() + 5
    claim = _decode(trust, _record(ident, deadline=deadline, wraps={"abc": b"w" * 72}))
    assert claim.certificate.instance == ident.instance
    assert claim.owner == f"ledger.{ident.instance}"
    assert (claim.run, claim.nonce, claim.state) == (b"r" * 16, b"n" * 16, STATE_RUNNING)
    assert claim.wraps == {"abc": b"w" * 72}
    assert abs(claim.deadline - deadline) < 0.002


def test_a_claim_with_a_flipped_byte_is_refused(trust: Trust) -> None:
    """Any change to a signed claim fails verification (or decoding), never passes."""
    raw = bytearray(_record(trust.identity("ledger")))
    for i in range(0, len(raw), 7):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        with pytest.raises(MeshError):
            _decode(trust, bytes(tampered))


def test_a_claim_filed_under_another_key_is_refused(trust: Trust) -> None:
    """A genuine claim copied under another call's key does not pass for that call's."""
    raw = _record(trust.identity("ledger"))
    with pytest.raises(Unauthenticated, match="names"):
        _decode(trust, raw, key=claim_key("ledger", "alice", "charge", "order-2"))


def test_a_claim_written_by_another_agent_is_refused(trust: Trust) -> None:
    """Only an instance of the callee agent may claim its calls."""
    raw = _record(trust.identity("mallory"))
    with pytest.raises(Unauthenticated, match="mallory"):
        _decode(trust, raw)


def test_a_claim_from_another_root_is_refused(trust: Trust) -> None:
    """A certificate of another trust root does not verify."""
    with pytest.raises(MeshError):
        _decode(trust, _record(Trust().identity("ledger")))


def test_a_claim_dated_outside_the_window_is_refused(trust: Trust) -> None:
    """Older than the window, or further ahead than the allowed skew: refused."""
    ident = trust.identity("ledger")
    with pytest.raises(Unauthenticated):
        _decode(trust, _record(ident, ts=time.time() + 60))
    with pytest.raises(Unauthenticated):
        _decode(trust, _record(ident, ts=time.time() - WINDOW - 60))


def test_malformed_claims_are_decode_errors(trust: Trust) -> None:
    """Junk, a wrong version or an unknown state is a DecodeError, nothing else."""
    for junk in (b"", b"\x00", msgpack.packb([b"x", b"y" * 64]), os.urandom(200)):
        with pytest.raises(DecodeError):
            _decode(trust, junk)
    with pytest.raises(DecodeError):
        _decode(trust, _record(trust.identity("ledger"), state="finished"))


def test_the_content_key_opens_only_for_its_reader() -> None:
    """A wrapped key opens with the pair's wrap key and the reader it names, nothing else."""
    from nacl.public import PrivateKey

    a, b, c = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    k_ab = claim_wrap_key(derive_pair_key(a, bytes(b.public_key)))
    k_ba = claim_wrap_key(derive_pair_key(b, bytes(a.public_key)))
    k_cb = claim_wrap_key(derive_pair_key(c, bytes(b.public_key)))
    ck = new_content_key()
    wrapped = wrap_content_key(k_ab, ck, KEY, "bbbb")
    assert len(wrapped) == 72
    assert unwrap_content_key(k_ba, wrapped, KEY, "bbbb") == ck
    assert unwrap_content_key(k_ba, wrapped, KEY, "cccc") is None
    assert unwrap_content_key(k_cb, wrapped, KEY, "bbbb") is None
    assert unwrap_content_key(k_ba, wrapped, claim_key("l", "a", "c", "other"), "bbbb") is None
    # The wrap key is not the pair key: a frame key never opens a wrapped key.
    assert unwrap_content_key(derive_pair_key(b, bytes(a.public_key)), wrapped, KEY, "bbbb") is None


def test_the_sealed_outcome_round_trips_and_hides_the_reply() -> None:
    """The box holds fingerprint and outcome; the plaintext is not in it."""
    ck = new_content_key()
    reply = b'{"receipt":"secret-receipt-42"}'
    box = seal_secret(ck, KEY, ClaimSecret(FP, Outcome("OK", reply)))
    assert b"secret-receipt-42" not in box and FP not in box
    assert open_secret(ck, KEY, box) == ClaimSecret(FP, Outcome("OK", reply))
    assert open_secret(new_content_key(), KEY, box) is None
    assert open_secret(ck, claim_key("l", "a", "c", "x"), box) is None
    running = seal_secret(ck, KEY, ClaimSecret(FP))
    assert open_secret(ck, KEY, running) == ClaimSecret(FP, None)
    unkept = seal_secret(ck, KEY, ClaimSecret(FP, Outcome("OK", None)))
    assert open_secret(ck, KEY, unkept) == ClaimSecret(FP, Outcome("OK", None))


def _claim(trust: Trust, state: str, *, deadline: float | None = None) -> Claim:
    ident = trust.identity("ledger")
    dl = time.time() + 5 if deadline is None else deadline
    return _decode(trust, _record(ident, state=state, deadline=dl))


def _decide(
    claim: Claim,
    secret: ClaimSecret | None,
    *,
    mine: bool = False,
    gone: bool = False,
    fp: bytes = FP,
) -> Verdict:
    return decide(
        claim, secret, fingerprint=fp, mine=mine, owner_gone=gone, now=time.time(), grace=2.0
    ).verdict


def test_decide_replays_a_done_claim(trust: Trust) -> None:
    """A done claim with the same body: its outcome, without running."""
    claim = _claim(trust, STATE_DONE)
    d = decide(
        claim, ClaimSecret(FP, Outcome("OK", b"{}")), fingerprint=FP, mine=False,
        owner_gone=True, now=time.time(), grace=2.0,
    )  # fmt: skip
    assert d.verdict is Verdict.REPLAY and d.outcome == Outcome("OK", b"{}")


def test_decide_refuses_another_body_under_the_same_key(trust: Trust) -> None:
    """Same key, different request: a conflict, whatever the state."""
    for state in (STATE_DONE, STATE_RUNNING, STATE_ABORTED):
        secret = ClaimSecret(FP, Outcome("OK", b"{}") if state == STATE_DONE else None)
        assert _decide(_claim(trust, state), secret, fp=b"g" * 64) is Verdict.CONFLICT


def test_decide_waits_for_a_live_writer_and_gives_up_on_a_gone_one(trust: Trust) -> None:
    """Running: wait while the writer lives; an honest error once it is gone."""
    claim = _claim(trust, STATE_RUNNING)
    assert _decide(claim, ClaimSecret(FP)) is Verdict.WAIT
    assert _decide(claim, ClaimSecret(FP), gone=True) is Verdict.UNKNOWN


def test_decide_gives_up_after_the_first_deadline(trust: Trust) -> None:
    """A claim still running past its deadline and the grace will get no outcome."""
    claim = _claim(trust, STATE_RUNNING, deadline=time.time() - 3)
    assert _decide(claim, ClaimSecret(FP)) is Verdict.UNKNOWN


def test_decide_never_runs_what_may_have_run(trust: Trust) -> None:
    """Aborted, unreadable, or done without a kept reply: unknown, never run."""
    assert _decide(_claim(trust, STATE_ABORTED), ClaimSecret(FP)) is Verdict.UNKNOWN
    assert _decide(_claim(trust, STATE_RUNNING), None) is Verdict.UNKNOWN
    assert _decide(_claim(trust, STATE_DONE), None) is Verdict.UNKNOWN
    done_unkept = ClaimSecret(FP, Outcome("OK", None))
    assert _decide(_claim(trust, STATE_DONE), done_unkept) is Verdict.UNKNOWN


def test_decide_takes_over_a_released_claim_and_recognises_its_own(trust: Trust) -> None:
    """Released: nothing ran, take it over; this request's own create: run."""
    assert _decide(_claim(trust, STATE_RELEASED), None) is Verdict.TAKE
    assert _decide(_claim(trust, STATE_RUNNING), ClaimSecret(FP), mine=True) is Verdict.RUN
