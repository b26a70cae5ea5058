"""The envelope's limits and refusals at their exact boundaries (``docs/protocol.md`` §3, §4).

Each refusal is fed the input it refuses and checked for its type and message; each limit is
checked on both sides (the largest accepted, the smallest refused).
"""

from __future__ import annotations

import struct

import msgpack
import pytest

from mesh._core.envelope import (
    FRAME_OVERHEAD,
    MAGIC,
    MAX_HEADER,
    PREFIX_LEN,
    Kind,
    check_trace_context,
    decode_frame,
    request_header,
)
from mesh.errors import DecodeError, InvalidArgument

MSG_ID = bytes(range(16))
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _event_map() -> dict[object, object]:
    return {"k": 3, "id": MSG_ID, "ts": 1, "fa": "a", "fi": "i", "ep": "e", "ct": b"c"}


def _frame(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">2sH", MAGIC, len(header)) + header + body


def _padded_event(size: int) -> bytes:
    """An event header of exactly ``size`` bytes, padded with an unknown string field."""
    base = _event_map()
    base["pad"] = "x" * 300  # str16 from 256 characters on: the length prefix stays 3 bytes
    overhead = len(msgpack.packb(base, use_bin_type=True)) - 300
    base["pad"] = "x" * (size - overhead)
    header: bytes = msgpack.packb(base, use_bin_type=True)
    assert len(header) == size
    return header


def _request(cert: bytes, **extra: str | None) -> bytes:
    fields: dict[str, str | None] = {"idempotency_key": None, "traceparent": None}
    fields.update(extra)
    return request_header(
        MSG_ID,
        1,
        "alice",
        "a1",
        "bob",
        "b1",
        "ask",
        2,
        1,
        cert,
        fields["idempotency_key"],
        fields["traceparent"],
        fields.get("tracestate"),
    )


class TestTraceContext:
    def test_w3c_values_pass(self) -> None:
        """A W3C traceparent and a printable tracestate are accepted, as is their absence."""
        check_trace_context(TRACEPARENT, "vendor=value")
        check_trace_context(None, None)
        check_trace_context(TRACEPARENT + "-ab-cd", "x" * 512)

    @pytest.mark.parametrize(
        "value", ["", "not-a-traceparent", " " + TRACEPARENT, TRACEPARENT.upper(), "00-abc-def-01"]
    )
    def test_malformed_traceparent_refused(self, value: str) -> None:
        """A traceparent outside the W3C grammar is InvalidArgument naming the field."""
        with pytest.raises(InvalidArgument, match=r"traceparent .* is not a W3C traceparent$"):
            check_trace_context(value, None)

    @pytest.mark.parametrize("value", ["", " x", "x ", "x" * 513, "a\nb", "caf\u00e9"])
    def test_malformed_tracestate_refused(self, value: str) -> None:
        """A tracestate that NATS headers cannot carry unchanged is InvalidArgument."""
        with pytest.raises(InvalidArgument, match="tracestate must be 1-512 printable ASCII"):
            check_trace_context(TRACEPARENT, value)


class TestRequestHeaderLimit:
    def test_header_of_max_header_bytes_accepted(self) -> None:
        """A request header of exactly MAX_HEADER bytes is built; its length is in the prefix."""
        overhead = len(_request(b"x" * 300)) - PREFIX_LEN - 300
        built = _request(b"x" * (MAX_HEADER - overhead))

        assert len(built) == PREFIX_LEN + MAX_HEADER
        assert struct.unpack(">H", built[2:4])[0] == MAX_HEADER
        assert decode_frame(built + bytes(16))[1] == PREFIX_LEN + MAX_HEADER

    def test_one_byte_more_refused(self) -> None:
        """One byte past MAX_HEADER is InvalidArgument giving the size and the limit."""
        overhead = len(_request(b"x" * 300)) - PREFIX_LEN - 300

        with pytest.raises(InvalidArgument, match=rf"of {MAX_HEADER + 1} bytes exceeds 16384$"):
            _request(b"x" * (MAX_HEADER - overhead + 1))

    def test_optional_fields_are_carried(self) -> None:
        """The idempotency key and the trace context go into the header when given."""
        header, _ = decode_frame(
            _request(b"c", idempotency_key="k", traceparent=TRACEPARENT, tracestate="a=b")
        )

        assert (header.idempotency_key, header.traceparent, header.tracestate) == (
            "k",
            TRACEPARENT,
            "a=b",
        )
        assert header.kind == Kind.REQUEST


class TestDecodeBoundaries:
    def test_prefix_alone_is_a_length_refusal(self) -> None:
        """Exactly the 4-byte prefix (header length 0) passes the size check and fails the
        length check."""
        with pytest.raises(DecodeError, match=r"header length out of range$"):
            decode_frame(MAGIC + b"\x00\x00")

    def test_header_of_max_header_bytes_decodes(self) -> None:
        """A header of exactly MAX_HEADER bytes is decoded."""
        header, end = decode_frame(_frame(_padded_event(MAX_HEADER), b"body"))

        assert header.kind == Kind.EVENT
        assert end == PREFIX_LEN + MAX_HEADER

    def test_header_past_max_header_refused(self) -> None:
        """A header length of MAX_HEADER + 1 is refused even when the frame holds it."""
        with pytest.raises(DecodeError, match=r"header length out of range$"):
            decode_frame(_frame(_padded_event(MAX_HEADER + 1)))

    def test_non_string_map_key_refused(self) -> None:
        """A header map with a key that is not a string is not valid msgpack for the mesh."""
        header = msgpack.packb({**_event_map(), 7: "x"}, use_bin_type=True)

        with pytest.raises(DecodeError, match=r"header is not valid msgpack \(ValueError\)$"):
            decode_frame(_frame(header))

    def test_extension_value_refused(self) -> None:
        """A msgpack extension value, even one byte long, is refused."""
        m = {**_event_map(), "future": msgpack.ExtType(1, b"x")}
        header = msgpack.packb(m, use_bin_type=True)

        with pytest.raises(DecodeError, match="header is not valid msgpack"):
            decode_frame(_frame(header))

    def test_refusal_frame_needs_only_its_fields(self) -> None:
        """A refusal (kind 4) needs id, ts, reply_to and status, and nothing else."""
        m = {"k": 4, "id": MSG_ID, "ts": 1, "re": bytes(16), "st": "UNAUTHENTICATED"}

        header, _ = decode_frame(_frame(msgpack.packb(m, use_bin_type=True)))

        assert header.kind == Kind.REFUSAL
        assert header.status == "UNAUTHENTICATED"


def test_frame_overhead() -> None:
    """What a frame adds at most: the prefix, the largest header and an event signature (the
    largest trailer: 64 bytes against a seal's 24 + 16)."""
    assert FRAME_OVERHEAD == 4 + 16384 + 64
