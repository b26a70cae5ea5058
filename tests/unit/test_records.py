"""Directory records and the signed-document format under them: what they carry, and every
refusal, fed the input it refuses (``docs/protocol.md`` §5, Directory)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mesh._core.identity import CertificateVerifier, TrustRoot
from mesh._core.records import (
    STATE_DRAINING,
    STATE_SERVING,
    EndpointInfo,
    decode_record,
    encode_record,
)
from mesh._core.signed import (
    SIGNATURE_LEN,
    open_document,
    sign_document,
    typed_field,
    verify_document,
)
from mesh.errors import DecodeError, Unauthenticated

ROOT = TrustRoot.generate()
BOB = ROOT.issue_identity("bob", instance="b1")
VERIFIER = CertificateVerifier(ROOT.public_key)


def _record(**changes: Any) -> bytes:
    """A record body signed by bob, with ``changes`` (a value of ``...`` removes the key)."""
    body: dict[str, Any] = {
        "cert": BOB.certificate.raw,
        "endpoints": [{"name": "echo", "idempotent": True}],
        "version": "1.0",
        "labels": {"zone": "a"},
        "ts": 1_700_000_000_123,
        "state": STATE_SERVING,
        "topics": ["news"],
    }
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not ...}
    return sign_document(body, lambda packed: BOB.keys.signing.sign(packed).signature)


class TestRecordRoundTrip:
    def test_every_field_read_back(self) -> None:
        """A record encoded with every field decodes to the same values."""
        raw = encode_record(
            BOB.keys.signing,
            BOB.certificate,
            endpoints=[
                EndpointInfo("echo", idempotent=True),
                EndpointInfo("slow"),
                EndpointInfo("tokens", streams=True),
            ],
            version="1.2.0",
            labels={"zone": "a"},
            ts=1_700_000_000.25,
            state=STATE_DRAINING,
            policy_revision=7,
            policy_error="bad rule",
            topics=("news", "alerts"),
            stale="head expired",
        )

        record = decode_record(raw, VERIFIER)

        assert record.endpoints == {
            "echo": EndpointInfo("echo", True),
            "slow": EndpointInfo("slow", False),
            "tokens": EndpointInfo("tokens", False, True),
        }
        endpoints = msgpack.unpackb(msgpack.unpackb(raw)[0])["endpoints"]
        assert [sorted(e) for e in endpoints] == [  # `streams` only where true: old bytes kept
            ["idempotent", "name"],
            ["idempotent", "name"],
            ["idempotent", "name", "streams"],
        ]
        assert (record.version, record.labels, record.ts) == ("1.2.0", {"zone": "a"}, 1.7e9 + 0.25)
        assert (record.state, record.policy_revision, record.policy_error) == (
            "draining",
            7,
            "bad rule",
        )
        assert (record.topics, record.stale) == (("news", "alerts"), "head expired")
        assert (record.agent, record.instance, record.key) == ("bob", "b1", "bob.b1")

    def test_optional_fields_left_out(self) -> None:
        """Absent optional fields are not on the wire and read back as their defaults."""
        raw = encode_record(
            BOB.keys.signing, BOB.certificate, endpoints=[], version="1", labels={}, ts=1.0
        )
        body = msgpack.unpackb(msgpack.unpackb(raw)[0])

        assert set(body) == {"cert", "endpoints", "version", "labels", "ts", "state", "topics"}
        assert body["ts"] == 1000
        record = decode_record(raw, VERIFIER)
        assert (record.policy_revision, record.policy_error, record.stale) == (None, None, None)

    def test_defaults_of_absent_keys(self) -> None:
        """Without labels, state, topics or idempotent the record takes the defaults."""
        raw = _record(labels=..., state=..., topics=..., endpoints=[{"name": "e"}])

        record = decode_record(raw, VERIFIER)

        assert record.labels == {}
        assert record.state == STATE_SERVING == "serving"
        assert record.topics == ()
        assert record.endpoints == {"e": EndpointInfo("e", False)}

    def test_schema_hash_read_back_and_left_out_when_none(self) -> None:
        """An endpoint's schema hash travels as ``schema`` (a str) and reads back; an endpoint
        without one has no key on the wire, so its bytes are those of older records."""
        digest = "sha256:" + "ab" * 32
        raw = encode_record(
            BOB.keys.signing,
            BOB.certificate,
            endpoints=[EndpointInfo("echo", True, schema=digest), EndpointInfo("old")],
            version="1",
            labels={},
            ts=1.0,
        )

        endpoints = msgpack.unpackb(msgpack.unpackb(raw)[0])["endpoints"]
        assert endpoints == [
            {"name": "echo", "idempotent": True, "schema": digest},
            {"name": "old", "idempotent": False},
        ]
        record = decode_record(raw, VERIFIER)
        assert record.endpoints["echo"] == EndpointInfo("echo", True, False, digest)
        assert record.endpoints["old"].schema is None

    def test_record_of_an_older_instance_has_no_schema(self) -> None:
        """A record written before schemas were published (no ``schema`` key, or nil) decodes,
        its endpoints' ``schema`` ``None``."""
        raw = _record(endpoints=[{"name": "e", "idempotent": True}, {"name": "f", "schema": None}])

        record = decode_record(raw, VERIFIER)

        assert record.endpoints == {"e": EndpointInfo("e", True), "f": EndpointInfo("f")}
        assert record.endpoints["e"].schema is None


class TestRecordRefusals:
    @pytest.mark.parametrize("value", [1, b"sha256:00", ["sha256:00"], True])
    def test_schema_not_a_string(self, value: Any) -> None:
        """An endpoint's schema hash that is not a string is a DecodeError naming the field."""
        with pytest.raises(DecodeError, match=r"endpoint field 'schema' must be str$"):
            decode_record(_record(endpoints=[{"name": "e", "schema": value}]), VERIFIER)

    @pytest.mark.parametrize("endpoints", [["echo"], [1], [None]])
    def test_endpoint_not_a_map(self, endpoints: list[Any]) -> None:
        """An endpoint that is not a map is a DecodeError."""
        with pytest.raises(DecodeError, match=r"directory record endpoints must be maps$"):
            decode_record(_record(endpoints=endpoints), VERIFIER)

    @pytest.mark.parametrize("value", [1, 0, "yes", None])
    @pytest.mark.parametrize("flag", ["idempotent", "streams"])
    def test_flag_not_bool(self, flag: str, value: Any) -> None:
        """An endpoint's idempotent or streams flag that is not a boolean is a DecodeError."""
        with pytest.raises(DecodeError, match=rf"endpoint field '{flag}' must be bool$"):
            decode_record(_record(endpoints=[{"name": "e", flag: value}]), VERIFIER)

    def test_endpoint_without_name(self) -> None:
        """An endpoint without a name is a DecodeError naming the field."""
        with pytest.raises(DecodeError, match="directory record endpoint field 'name' is missing"):
            decode_record(_record(endpoints=[{"idempotent": True}]), VERIFIER)

    @pytest.mark.parametrize("labels", [["a"], {"a": 1}, {"a": b"b"}, "zone=a"])
    def test_labels_not_strings(self, labels: Any) -> None:
        """Labels that do not map strings to strings are a DecodeError."""
        with pytest.raises(DecodeError, match=r"labels must map strings to strings$"):
            decode_record(_record(labels=labels), VERIFIER)

    @pytest.mark.parametrize(
        "changes",
        [
            {"state": 1},
            {"state": None},
            {"policy_revision": "7"},
            {"policy_revision": True},
            {"policy_error": 1},
            {"stale": b"x"},
            {"topics": "news"},
            {"topics": None},
            {"topics": ["a", 1]},
        ],
        ids=repr,
    )
    def test_field_of_wrong_type(self, changes: dict[str, Any]) -> None:
        """Any optional field of the wrong type is a DecodeError."""
        with pytest.raises(DecodeError, match=r"directory record has a field of the wrong type$"):
            decode_record(_record(**changes), VERIFIER)

    @pytest.mark.parametrize(
        "changes",
        [{"policy_revision": 3}, {"policy_error": "e"}, {"stale": "s"}, {"topics": []}],
        ids=repr,
    )
    def test_optional_field_of_right_type_accepted(self, changes: dict[str, Any]) -> None:
        """Each optional field of the right type is accepted on its own."""
        assert decode_record(_record(**changes), VERIFIER).version == "1.0"

    def test_forged_signature_names_the_instance(self) -> None:
        """A record not signed by its certificate's key is Unauthenticated naming the instance."""
        other = ROOT.issue_identity("eve")
        body = msgpack.unpackb(msgpack.unpackb(_record())[0])
        forged = sign_document(body, lambda packed: other.keys.signing.sign(packed).signature)

        with pytest.raises(Unauthenticated, match=r"directory record of bob.b1 is forged$"):
            decode_record(forged, VERIFIER)

    def test_certificate_checked_before_the_signature(self) -> None:
        """A record whose certificate is from another root is refused for the certificate."""
        other = TrustRoot.generate().issue_identity("bob")
        body = msgpack.unpackb(msgpack.unpackb(_record())[0])
        body["cert"] = other.certificate.raw
        raw = sign_document(body, lambda packed: other.keys.signing.sign(packed).signature)

        with pytest.raises(Unauthenticated, match="not by this mesh's trust root"):
            decode_record(raw, VERIFIER)


class TestSignedDocument:
    def test_round_trip(self) -> None:
        """open_document gives back the body, its exact bytes and the signature."""
        raw = sign_document({"a": 1}, lambda packed: bytes(SIGNATURE_LEN))

        body, packed, sig = open_document(raw, "thing")

        assert body == {"a": 1}
        assert packed == msgpack.packb({"a": 1})
        assert sig == bytes(64)

    @pytest.mark.parametrize(
        "outer", [[b"x"], [b"x", bytes(64), b"y"], {"a": 1}, b"body"], ids=repr
    )
    def test_not_a_pair(self, outer: Any) -> None:
        """Anything but a 2-element array is a DecodeError naming the document."""
        with pytest.raises(
            DecodeError, match=r"thing must be a 2-element array \[body, signature\]$"
        ):
            open_document(msgpack.packb(outer), "thing")

    @pytest.mark.parametrize(
        "pair",
        [["body", bytes(64)], [b"\x80", "sig"], [b"\x80", bytes(63)], [b"\x80", bytes(65)]],
        ids=repr,
    )
    def test_body_or_signature_not_binary(self, pair: list[Any]) -> None:
        """A body or signature that is not binary, or a signature that is not 64 bytes, is a
        DecodeError."""
        with pytest.raises(DecodeError, match=r"thing body and 64-byte signature must be binary$"):
            open_document(msgpack.packb(pair, use_bin_type=True), "thing")

    @pytest.mark.parametrize("body", [[1], "s", 1])
    def test_body_not_a_map(self, body: Any) -> None:
        """A body that is not a map is a DecodeError."""
        raw = msgpack.packb([msgpack.packb(body), bytes(64)], use_bin_type=True)

        with pytest.raises(DecodeError, match=r"thing body must be a map$"):
            open_document(raw, "thing")

    @pytest.mark.parametrize(
        ("raw", "error"),
        [
            (b"\xc1", "FormatError"),
            (msgpack.packb([b"\xc1", bytes(64)], use_bin_type=True), "FormatError"),
            (msgpack.packb({1: 2}), "ValueError"),
            (msgpack.packb([msgpack.packb({1: 2}), bytes(64)]), "ValueError"),
        ],
    )
    def test_junk_is_malformed(self, raw: bytes, error: str) -> None:
        """Bytes that are not msgpack, or a map with a non-string key, are "malformed"."""
        with pytest.raises(DecodeError, match=rf"malformed thing \({error}\)$"):
            open_document(raw, "thing")

    def test_typed_field(self) -> None:
        """typed_field returns a present value of the exact type, and refuses the others."""
        body = {"n": 1, "b": True, "s": "x"}

        assert typed_field(body, "n", int, "doc") == 1
        assert typed_field(body, "b", bool, "doc") is True
        with pytest.raises(DecodeError, match=r"doc field 'b' must be int$"):
            typed_field(body, "b", int, "doc")
        with pytest.raises(DecodeError, match=r"doc field 's' must be bytes$"):
            typed_field(body, "s", bytes, "doc")
        with pytest.raises(DecodeError, match=r"doc field 'x' is missing$"):
            typed_field(body, "x", str, "doc")

    def test_verify_document(self) -> None:
        """A good signature passes; a bad one or an unusable key is Unauthenticated with the
        given refusal."""
        packed = msgpack.packb({"a": 1})
        sig = BOB.keys.signing.sign(packed).signature

        verify_document(packed, sig, BOB.keys.sign_pk, "no")
        with pytest.raises(Unauthenticated, match=r"^UNAUTHENTICATED: forged$"):
            verify_document(packed + b"x", sig, BOB.keys.sign_pk, "forged")
        with pytest.raises(Unauthenticated, match=r"bad key$"):
            verify_document(packed, sig, b"short", "bad key")
