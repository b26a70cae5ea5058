"""Idempotency claims at their limits (``docs/protocol.md`` §17): the record's refusals with
their messages, the time checks on both sides, and the sealed box's refusals."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mesh._core.claims import (
    CLAIM_VERSION,
    STATE_RUNNING,
    Claim,
    ClaimSecret,
    Outcome,
    Verdict,
    _seal,
    decide,
    decode_claim,
    encode_claim,
    new_content_key,
    open_secret,
    seal_secret,
    unwrap_content_key,
    wrap_content_key,
)
from mesh._core.identity import CertificateVerifier
from mesh._core.signed import sign_document
from mesh.errors import DecodeError, Unauthenticated
from mesh.testing import Trust

TRUST = Trust()
LEDGER = TRUST.identity("ledger")
KEY = "k1"
NOW = LEDGER.certificate.not_before + 3600.0
WINDOW = 600.0


def _decode(raw: bytes, *, now: float = NOW, max_future: float = 5.0) -> Claim:
    return decode_claim(
        raw, CertificateVerifier(TRUST.root.public_key, clock=lambda: now), key=KEY,
        agent="ledger", now=now, window=WINDOW, max_future=max_future,
    )  # fmt: skip


def _claim(ts: float = NOW, **body: Any) -> bytes:
    raw = encode_claim(
        LEDGER.keys.signing, LEDGER.certificate, key=KEY, run=b"r" * 16, nonce=b"n" * 16,
        ts=ts, deadline=ts + 5, state=STATE_RUNNING, wraps={}, box=b"x" * 40,
    )  # fmt: skip
    if not body:
        return raw
    fields = msgpack.unpackb(msgpack.unpackb(raw)[0])
    fields.update(body)
    return sign_document(fields, lambda packed: LEDGER.keys.signing.sign(packed).signature)


class TestRecord:
    def test_version_1_only(self) -> None:
        """A claim record of another version is refused saying so."""
        assert CLAIM_VERSION == 1
        with pytest.raises(DecodeError, match=r"unsupported idempotency claim version$"):
            _decode(_claim(v=2))

    @pytest.mark.parametrize("wraps", [{"i": "key"}, {"i": 1}], ids=repr)
    def test_wrapped_keys_must_be_bytes(self, wraps: dict[Any, Any]) -> None:
        """Wrapped keys that do not map instance ids to bytes are refused."""
        with pytest.raises(DecodeError, match=r"keys must map instance ids to bytes$"):
            _decode(_claim(keys=wraps))

    def test_wrapped_keys_accepted(self) -> None:
        """Wrapped keys mapping instance ids to bytes are read back."""
        assert _decode(_claim(keys={"i": b"w"})).wraps == {"i": b"w"}

    def test_signed_at_the_start_of_the_certificate(self) -> None:
        """A claim dated exactly at its certificate's not_before is accepted; just before, not."""
        start = float(LEDGER.certificate.not_before)

        assert _decode(_claim(ts=start), now=start).ts == start
        with pytest.raises(Unauthenticated, match="was signed outside its certificate's valid"):
            _decode(_claim(ts=start - 0.001), now=start)

    def test_signed_at_the_end_of_the_certificate(self) -> None:
        """A claim dated exactly at not_after is refused (the certificate had expired)."""
        end = float(LEDGER.certificate.not_after)

        with pytest.raises(Unauthenticated, match="was signed outside its certificate's valid"):
            _decode(_claim(ts=end), now=end)
        assert _decode(_claim(ts=end - 0.001), now=end).ts == end - 0.001

    def test_future_limit(self) -> None:
        """A claim max_future ahead is accepted; a millisecond more is refused."""
        assert _decode(_claim(ts=NOW + 5)).ts == NOW + 5
        with pytest.raises(Unauthenticated, match=r"is dated outside the claim window$"):
            _decode(_claim(ts=NOW + 5.001))

    def test_window_limit(self) -> None:
        """A claim exactly one window old is accepted; a millisecond older is refused."""
        assert _decode(_claim(ts=NOW - WINDOW)).ts == NOW - WINDOW
        with pytest.raises(Unauthenticated, match=r"is dated outside the claim window$"):
            _decode(_claim(ts=NOW - WINDOW - 0.001))


class TestBox:
    def test_too_short_box_does_not_open(self) -> None:
        """A box shorter than nonce and tag opens to nothing; nonce and tag alone is an empty
        plaintext, which is no secret."""
        ck = new_content_key()

        assert open_secret(ck, KEY, bytes(39)) is None
        assert open_secret(ck, KEY, _seal(ck, b"mesh-claim-v1" + KEY.encode(), b"")) is None

    def test_wrapped_key_for_the_reader_only(self) -> None:
        """A content key wrapped for one reader unwraps for it, not for another."""
        wrap, ck = bytes(range(32)), new_content_key()
        wrapped = wrap_content_key(wrap, ck, KEY, "i1")

        assert len(wrapped) == 72
        assert unwrap_content_key(wrap, wrapped, KEY, "i1") == ck
        assert unwrap_content_key(wrap, wrapped, KEY, "i2") is None
        assert unwrap_content_key(wrap, wrapped[:39], KEY, "i1") is None

    def test_round_trip(self) -> None:
        """A sealed secret opens to its fingerprint and outcome."""
        ck = new_content_key()
        secret = ClaimSecret(b"fp", Outcome("OK", b"body"))

        assert open_secret(ck, KEY, seal_secret(ck, KEY, secret)) == secret
        no_body = ClaimSecret(b"fp", Outcome("OK", None))
        assert open_secret(ck, KEY, seal_secret(ck, KEY, no_body)) == no_body

    @pytest.mark.parametrize(
        "plain",
        [
            [b"fp"],
            {"fp": "not-bytes"},
            {"st": "OK"},
            {"fp": b"f", "st": 1},
            {"fp": b"f", "st": "OK", "body": "text"},
        ],
        ids=repr,
    )
    def test_malformed_secret_is_none(self, plain: Any) -> None:
        """A box holding anything but {fp: bytes[, st: str[, body: bytes]]} opens to None."""
        ck = new_content_key()
        box = _seal(ck, b"mesh-claim-v1" + KEY.encode(), msgpack.packb(plain, use_bin_type=True))

        assert open_secret(ck, KEY, box) is None

    def test_non_string_map_keys_refused(self) -> None:
        """A box whose map has a non-string key opens to None."""
        ck = new_content_key()
        plain = msgpack.packb({"fp": b"f", 1: 2}, use_bin_type=True)

        assert open_secret(ck, KEY, _seal(ck, b"mesh-claim-v1" + KEY.encode(), plain)) is None


def test_running_claim_waits_until_deadline_and_grace() -> None:
    """Another instance's running claim is waited for up to deadline + grace; after, the
    outcome is unknown."""
    claim = _decode(_claim())
    secret = ClaimSecret(b"fp")
    kwargs: dict[str, Any] = {"fingerprint": b"fp", "mine": False, "owner_gone": False}

    assert decide(claim, secret, now=claim.deadline + 2, grace=2, **kwargs).verdict is (
        Verdict.WAIT
    )
    late = decide(claim, secret, now=claim.deadline + 2.001, grace=2, **kwargs)
    assert late.verdict is Verdict.UNKNOWN
    assert late.reason.endswith("recorded no outcome by the first deadline")


def test_keys_and_associated_data_as_section_17_states() -> None:
    """W = BLAKE2b(K, digest_size=32, person="mesh-claim-v1"); a wrapped key is sealed with
    aad "mesh-claim-v1" ‖ key ‖ 0x00 ‖ reader, the box with "mesh-claim-v1" ‖ key."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as decrypt
    from nacl.encoding import RawEncoder
    from nacl.hash import blake2b

    from mesh._core.claims import claim_wrap_key

    pair_key = bytes(range(32))
    wrap = blake2b(pair_key, digest_size=32, person=b"mesh-claim-v1", encoder=RawEncoder)
    assert claim_wrap_key(pair_key) == wrap
    ck = new_content_key()
    wrapped = wrap_content_key(wrap, ck, "k", "i")
    assert decrypt(wrapped[24:], b"mesh-claim-v1k\x00i", wrapped[:24], wrap) == ck
    box = seal_secret(ck, "k", ClaimSecret(b"fp"))
    assert msgpack.unpackb(decrypt(box[24:], b"mesh-claim-v1k", box[:24], ck)) == {"fp": b"fp"}
