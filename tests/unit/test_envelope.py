"""Unit tests for mesh.envelope: frame encoding and strict header decoding."""

from __future__ import annotations

import struct

import msgpack
import pytest

from mesh._core.envelope import (
    _FIELDS,
    _REQUIRED,
    MAGIC,
    Header,
    Kind,
    decode_frame,
    encode_frame,
    encode_header,
)
from mesh.errors import DecodeError

MSG_ID = bytes(range(16))


def _full_header(kind: Kind) -> Header:
    """A header of ``kind`` with every required field (and a few optional ones) set."""
    common = {"kind": kind, "id": MSG_ID, "ts": 1_700_000_000_000}
    by_kind = {
        Kind.REQUEST: {
            "from_agent": "alice",
            "from_instance": "a1",
            "to_agent": "bob",
            "to_instance": "b1",
            "name": "ask",
            "deadline": 1_700_000_005_000,
            "attempt": 1,
            "cert": b"cert-bytes",
            "idempotency_key": "k-1",
            "traceparent": "00-abc-def-01",
            "tracestate": "x=y",
        },
        Kind.REPLY: {
            "from_agent": "bob",
            "from_instance": "b1",
            "to_agent": "alice",
            "to_instance": "a1",
            "reply_to": bytes(16),
            "status": "OK",
            "seq": 0,
            "end": True,
        },
        Kind.EVENT: {
            "from_agent": "alice",
            "from_instance": "a1",
            "name": "news",
            "cert": b"cert-bytes",
        },
        Kind.REFUSAL: {
            "reply_to": bytes(16),
            "status": "PERMISSION_DENIED",
            "message": "no",
            "rule": "deny-all",
            "retry_after_ms": 250,
        },
        Kind.CONTROL: {
            "from_agent": "alice",
            "from_instance": "a1",
            "to_agent": "bob",
            "to_instance": "b1",
            "reply_to": bytes(16),
            "op": "credit",
            "credit": 32,
        },
    }
    return Header(**common, **by_kind[kind])


def _frame_from_map(m: dict[str, object], body: bytes = b"") -> bytes:
    hb = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">2sH", MAGIC, len(hb)) + hb + body


class TestRoundTrip:
    @pytest.mark.parametrize("kind", list(Kind))
    def test_round_trip(self, kind: Kind) -> None:
        """A header of each kind decodes to an equal header, and the body follows it."""
        header = _full_header(kind)

        frame, end = encode_frame(header, b"the body")
        decoded, dend = decode_frame(frame)

        assert decoded == header
        assert dend == end
        assert frame[end:] == b"the body"

    @pytest.mark.parametrize("kind", list(Kind))
    def test_encode_header_is_frame_prefix(self, kind: Kind) -> None:
        """encode_header gives exactly the bytes before the body of encode_frame."""
        header = _full_header(kind)

        frame, end = encode_frame(header, b"body")

        assert encode_header(header) == frame[:end]

    def test_none_fields_left_out(self) -> None:
        """Absent optional fields are not put on the wire."""
        m = _full_header(Kind.EVENT).to_map()

        assert set(m) == {"k", "id", "ts", "fa", "fi", "ep", "ct"}

    def test_unknown_keys_ignored(self) -> None:
        """Keys this version does not know are skipped."""
        m = _full_header(Kind.EVENT).to_map()
        m["zz"] = 1
        m["future"] = "x"

        header, _ = decode_frame(_frame_from_map(m))

        assert header == _full_header(Kind.EVENT)


class TestRefused:
    @pytest.mark.parametrize(
        ("kind", "attr"),
        [(kind, attr) for kind in Kind for attr in _REQUIRED[kind]],
    )
    def test_missing_required_field(self, kind: Kind, attr: str) -> None:
        """Dropping any required field of a kind is a DecodeError naming its wire key."""
        m = _full_header(kind).to_map()
        del m[_FIELDS[attr][0]]

        with pytest.raises(DecodeError, match="missing") as ei:
            decode_frame(_frame_from_map(m))

        assert repr(_FIELDS[attr][0]) in ei.value.message

    def test_missing_kind(self) -> None:
        """A header without a kind is a DecodeError."""
        m = _full_header(Kind.EVENT).to_map()
        del m["k"]

        with pytest.raises(DecodeError, match="kind"):
            decode_frame(_frame_from_map(m))

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("ts", "1700000000000"),
            ("ts", 1.5),
            ("k", True),
            ("id", "0123456789abcdef"),
            ("fa", b"alice"),
            ("ct", "cert"),
            ("end", 1),
        ],
    )
    def test_wrong_type(self, key: str, value: object) -> None:
        """A field of the wrong type is a DecodeError naming the field."""
        m = _full_header(Kind.EVENT).to_map()
        m[key] = value

        with pytest.raises(DecodeError, match=repr(key)):
            decode_frame(_frame_from_map(m))

    def test_nil_counts_as_absent(self) -> None:
        """A nil value is the same as a missing key: fine when optional, refused when required."""
        m = _full_header(Kind.EVENT).to_map()
        m["sq"] = None
        assert decode_frame(_frame_from_map(m))[0].seq is None
        m["ct"] = None
        with pytest.raises(DecodeError, match="'ct' missing"):
            decode_frame(_frame_from_map(m))

    def test_unknown_kind(self) -> None:
        """A kind number with no definition is a DecodeError."""
        m = _full_header(Kind.EVENT).to_map()
        m["k"] = 99

        with pytest.raises(DecodeError, match="unknown frame kind"):
            decode_frame(_frame_from_map(m))

    def test_short_id(self) -> None:
        """A message id that is not 16 bytes is a DecodeError."""
        m = _full_header(Kind.EVENT).to_map()
        m["id"] = bytes(15)

        with pytest.raises(DecodeError, match="16 bytes"):
            decode_frame(_frame_from_map(m))

    def test_bad_magic(self) -> None:
        """A frame with another magic or version is a DecodeError."""
        frame, _ = encode_frame(_full_header(Kind.EVENT))

        with pytest.raises(DecodeError, match="magic"):
            decode_frame(b"\x4d\x02" + frame[2:])

    @pytest.mark.parametrize("frame", [b"", b"\x4d", b"\x4d\x01\x00"])
    def test_shorter_than_prefix(self, frame: bytes) -> None:
        """A frame shorter than its 4-byte prefix is a DecodeError."""
        with pytest.raises(DecodeError, match="prefix"):
            decode_frame(frame)

    def test_header_length_beyond_frame(self) -> None:
        """A header length larger than the frame is a DecodeError."""
        frame, end = encode_frame(_full_header(Kind.EVENT))

        with pytest.raises(DecodeError, match="length"):
            decode_frame(frame[: end - 1])

    def test_zero_header_length(self) -> None:
        """A zero header length is a DecodeError."""
        with pytest.raises(DecodeError, match="length"):
            decode_frame(MAGIC + b"\x00\x00" + b"body")

    def test_header_not_a_map(self) -> None:
        """A header that is msgpack but not a map is a DecodeError."""
        hb = msgpack.packb("hello")

        with pytest.raises(DecodeError, match="map"):
            decode_frame(MAGIC + struct.pack(">H", len(hb)) + hb)

    def test_header_not_msgpack(self) -> None:
        """Header bytes that are not msgpack are a DecodeError."""
        with pytest.raises(DecodeError, match="msgpack"):
            decode_frame(MAGIC + b"\x00\x01" + b"\xc1")

    def test_every_truncated_header_refused(self) -> None:
        """Cutting a frame anywhere inside its prefix or header is a DecodeError."""
        frame, end = encode_frame(_full_header(Kind.REQUEST), b"body")

        for n in range(end):
            with pytest.raises(DecodeError):
                decode_frame(frame[:n])
