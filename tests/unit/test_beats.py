"""Signed heartbeats (``docs/protocol.md`` §36): what a beat carries and every refusal of the
decoder, fed the input it refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from nacl.signing import SigningKey

from mesh._core.beats import BEAT_CONTEXT, decode_beat, encode_beat
from mesh.errors import DecodeError, Unauthenticated

SIGNING = SigningKey(bytes(32))
PK = bytes(SIGNING.verify_key)


def _beat(fields: Any, sig: Any = None) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    signature = SIGNING.sign(body).signature if sig is None else sig
    raw: bytes = msgpack.packb([body, signature], use_bin_type=True)
    return raw


GOOD = [BEAT_CONTEXT, "mesh", "bob", "b1", 1_700_000_000_250, 3]


def test_round_trip_and_verify() -> None:
    """An encoded beat decodes to its fields (ts in seconds) and verifies with its key."""
    beat = decode_beat(encode_beat(SIGNING, "mesh", "bob", "b1", 1_700_000_000_250, 3))

    assert (beat.prefix, beat.agent, beat.instance, beat.up) == ("mesh", "bob", "b1", 3)
    assert beat.ts == 1_700_000_000.25
    assert beat.key == "bob.b1"
    beat.verify(PK)
    assert BEAT_CONTEXT == "mesh-beat-v1"


def test_body_is_binary_on_the_wire() -> None:
    """The body is msgpack bin (not str) inside the outer array."""
    body, _sig = msgpack.unpackb(encode_beat(SIGNING, "mesh", "a", "i", 1, 0), raw=False)

    assert isinstance(body, bytes)
    assert msgpack.unpackb(body) == [BEAT_CONTEXT, "mesh", "a", "i", 1, 0]


def test_forged_beat_refused() -> None:
    """A beat signed by another key is Unauthenticated naming the instance."""
    beat = decode_beat(_beat(GOOD, SigningKey(bytes([1]) * 32).sign(b"x").signature))

    with pytest.raises(Unauthenticated, match=r"beat of bob.b1 is forged$"):
        beat.verify(PK)


def test_size_limit() -> None:
    """A beat of 512 bytes is decoded; 513 bytes are refused before decoding."""
    n = next(n for n in range(300, 512) if len(_beat([*GOOD[:2], "a" * n, *GOOD[3:]])) >= 512)
    at_limit = _beat([*GOOD[:2], "a" * n, *GOOD[3:]])
    assert len(at_limit) == 512
    assert decode_beat(at_limit).agent == "a" * n

    with pytest.raises(DecodeError, match=r"^INVALID_ARGUMENT: beat too large$"):
        decode_beat(at_limit[:-1] + b"xx")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xc1", "FormatError"),
        (msgpack.packb([b"\xc1", bytes(64)]), "FormatError"),
        (msgpack.packb([msgpack.packb([1, 2]), bytes(64)]), "ValueError"),
        (msgpack.packb([b"x"]), "ValueError"),
        (msgpack.packb(5), "TypeError"),
        (msgpack.packb({1: 2}), "ValueError"),
        (msgpack.packb([msgpack.packb({1: 2}), bytes(64)]), "ValueError"),
        (msgpack.packb([msgpack.packb([{1: 2}, 1, 1, 1, 1, 1]), bytes(64)]), "ValueError"),
    ],
)
def test_malformed(raw: bytes, error: str) -> None:
    """Bytes that do not unpack to [body, signature] with six fields are "malformed"."""
    with pytest.raises(DecodeError, match=rf"malformed beat \({error}\)$"):
        decode_beat(raw)


def test_strict_msgpack_map_keys_in_the_outer_array() -> None:
    """A non-string map key is refused even where a map could unpack to two items."""
    with pytest.raises(DecodeError, match=r"malformed beat \(ValueError\)$"):
        decode_beat(msgpack.packb({1: 2, 3: 4}))


@pytest.mark.parametrize(
    ("fields", "sig"),
    [
        (GOOD, "s" * 64),
        (GOOD, bytes(63)),
        (GOOD, bytes(65)),
        (["mesh-beat-v2", *GOOD[1:]], None),
        ([GOOD[0], 1, *GOOD[2:]], None),
        ([*GOOD[:2], b"bob", *GOOD[3:]], None),
        ([*GOOD[:3], None, *GOOD[4:]], None),
        ([*GOOD[:4], 1.5, GOOD[5]], None),
        ([*GOOD[:4], True, GOOD[5]], None),
        ([*GOOD[:5], "3"], None),
    ],
    ids=repr,
)
def test_field_of_wrong_type(fields: list[Any], sig: Any) -> None:
    """A signature that is not 64 bytes of binary, another context or a field of the wrong
    type is refused."""
    with pytest.raises(DecodeError, match=r"beat has a field of the wrong type$"):
        decode_beat(_beat(fields, sig))


def test_body_not_binary_refused() -> None:
    """A body given as a string is refused."""
    raw = msgpack.packb(["body-as-str", bytes(64)], use_bin_type=True)

    with pytest.raises(DecodeError, match=r"malformed beat|wrong type"):
        decode_beat(raw)


def test_body_string_of_six_fields_refused() -> None:
    """A body that is a msgpack str holding the fields' bytes is not binary: refused."""
    body = msgpack.packb(GOOD, use_bin_type=True)
    raw = msgpack.packb([body.decode("latin-1"), bytes(64)], use_bin_type=True)

    with pytest.raises(DecodeError):
        decode_beat(raw)


def test_fields_not_a_list_refused() -> None:
    """A body that unpacks to something other than a list of six is refused."""
    raw = _beat(tuple(GOOD))  # msgpack writes a tuple as an array: read back as a list
    assert decode_beat(raw).agent == "bob"
    body = msgpack.packb("abcdef")
    with pytest.raises(DecodeError, match=r"beat has a field of the wrong type$"):
        decode_beat(msgpack.packb([body, bytes(64)], use_bin_type=True))
