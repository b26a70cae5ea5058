"""Property tests of the decoders that read untrusted bytes: frames, certificates and directory
records never fail with anything but the mesh's own errors, whatever the input.

``decode_frame`` and ``Certificate.decode`` may only raise ``DecodeError``; ``decode_record``
may only raise ``MeshError`` subclasses (``DecodeError`` or ``Unauthenticated``). Inputs are
arbitrary bytes, mutations (flips, truncations, insertions, deletions) of genuine encodings, and
msgpack-encoded random maps shaped like the real thing.
"""

import contextlib
import os
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mesh import Certificate, DecodeError, MeshError
from mesh._core.crypto import derive_pair_key, open_body, seal_body, verify_frame
from mesh._core.envelope import MAGIC, PREFIX, Header, Kind, decode_frame, encode_frame
from mesh._core.records import EndpointInfo, decode_record, encode_record
from mesh.control_plane import CertificateVerifier
from mesh.testing import Trust

# byte-level inputs are cheap to generate: many examples; structured ones cost more: fewer
PROPERTY = settings(max_examples=150, deadline=None)
STRUCTURED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- genuine encodings to start from -----------------------------------------------------------

TRUST = Trust()
ALICE = TRUST.identity("alice", roles=["caller"])
BOB = TRUST.identity("bob")
VERIFIER = CertificateVerifier(TRUST.root.public_key)
PAIR_KEY = derive_pair_key(ALICE.keys.box, BOB.keys.box_pk)
NOW_MS = int(time.time() * 1000)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _request_header() -> Header:
    return Header(
        kind=Kind.REQUEST,
        id=os.urandom(16),
        ts=NOW_MS,
        from_agent="alice",
        from_instance=ALICE.instance,
        to_agent="bob",
        to_instance=BOB.instance,
        name="echo",
        deadline=NOW_MS + 5000,
        attempt=1,
        idempotency_key="k-1",
        traceparent=TRACEPARENT,
        tracestate="vendor=x",
        cert=ALICE.certificate.raw,
    )


def _sealed(header: Header, body: bytes) -> bytes:
    aad, _ = encode_frame(header)
    return aad + seal_body(PAIR_KEY, aad, body)


REQUEST = _sealed(_request_header(), b'{"text":"hi"}')
REPLY = _sealed(
    Header(
        kind=Kind.REPLY,
        id=os.urandom(16),
        ts=NOW_MS,
        from_agent="bob",
        from_instance=BOB.instance,
        to_agent="alice",
        to_instance=ALICE.instance,
        reply_to=os.urandom(16),
        status="OK",
        seq=0,
        end=True,
    ),
    b'{"text":"bob:hi"}',
)
_event, _ = encode_frame(
    Header(
        kind=Kind.EVENT,
        id=os.urandom(16),
        ts=NOW_MS,
        from_agent="alice",
        from_instance=ALICE.instance,
        name="news",
        cert=ALICE.certificate.raw,
    ),
    b'{"text":"news"}',
)
EVENT = _event + ALICE.keys.signing.sign(_event).signature
REFUSAL = encode_frame(
    Header(
        kind=Kind.REFUSAL,
        id=os.urandom(16),
        ts=NOW_MS,
        reply_to=bytes(16),
        status="UNAUTHENTICATED",
        message="no",
        rule="r",
        retry_after_ms=100,
    )
)[0]
FRAMES = [REQUEST, REPLY, EVENT, REFUSAL]
CERT = ALICE.certificate.raw
RECORD = encode_record(
    BOB.keys.signing,
    BOB.certificate,
    endpoints=[EndpointInfo("echo", idempotent=True), EndpointInfo("slow")],
    version="1.2.0",
    labels={"zone": "a"},
    ts=time.time(),
)


# --- strategies --------------------------------------------------------------------------------


def _leaves(*, finite: bool) -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=not finite, allow_infinity=not finite)
        | st.text(max_size=24)
        | st.binary(max_size=48)
    )


def _values(*, finite: bool = False) -> st.SearchStrategy[Any]:
    """Anything msgpack can encode (with str map keys), a few levels deep."""
    return st.recursive(
        _leaves(finite=finite),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )


VALUES = _values()
FINITE_VALUES = _values(finite=True)
# values of the types the decoders expect, so random maps also get past the type checks
TYPED = (
    VALUES
    | st.integers(0, 5)
    | st.integers(NOW_MS - 10**6, NOW_MS + 10**6)
    | st.binary(min_size=16, max_size=16)
    | st.binary(min_size=32, max_size=32)
    | st.sampled_from(["alice", "bob", "echo", ALICE.instance, "OK", "UNAUTHENTICATED"])
)


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _framed(header_bytes: bytes, body: bytes = b"") -> bytes:
    return PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + body


def _header_map(frame: bytes) -> dict[str, Any]:
    _magic, hlen = PREFIX.unpack_from(frame)
    return msgpack.unpackb(frame[PREFIX.size : PREFIX.size + hlen], raw=False)


CERT_BODY = msgpack.unpackb(Certificate.decode(CERT)[1])
RECORD_BODY = msgpack.unpackb(msgpack.unpackb(RECORD)[0])
# every header key is in one of the genuine frames; records also have two optional keys
HEADER_KEYS = sorted({key for frame in FRAMES for key in _header_map(frame)})
CERT_KEYS = sorted(CERT_BODY)
RECORD_KEYS = [*sorted(RECORD_BODY), "policy_revision", "policy_error"]


@st.composite
def near_valid_maps(
    draw: st.DrawFn, bases: list[dict[str, Any]], keys: list[str], values: Any
) -> dict[str, Any]:
    """A genuine map with some keys dropped and some replaced or added with random values."""
    out = dict(draw(st.sampled_from(bases)))
    for key in draw(st.lists(st.sampled_from(sorted(out)), max_size=3)):
        out.pop(key, None)
    out.update(
        draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=4), values, max_size=3))
    )
    return out


@st.composite
def flipped(draw: st.DrawFn, originals: list[bytes]) -> tuple[bytes, bytes]:
    """``(original, copy with 1-3 distinct bytes XORed with a non-zero mask)``."""
    original = draw(st.sampled_from(originals))
    data = bytearray(original)
    for index in draw(st.sets(st.integers(0, len(data) - 1), min_size=1, max_size=3)):
        data[index] ^= draw(st.integers(1, 255))
    return original, bytes(data)


@st.composite
def truncated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    original = draw(st.sampled_from(originals))
    return original[: draw(st.integers(0, len(original) - 1))]


@st.composite
def inserted(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    original = draw(st.sampled_from(originals))
    at = draw(st.integers(0, len(original)))
    return original[:at] + draw(st.binary(min_size=1, max_size=16)) + original[at:]


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """Several flips, truncations, insertions and deletions in a row."""
    data = bytearray(draw(st.sampled_from(originals)))
    for op in draw(st.lists(st.sampled_from("ftid"), min_size=1, max_size=5)):
        if op == "f" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif op == "t":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "i":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "d" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


# --- helpers -----------------------------------------------------------------------------------


def decode_or_refuse(frame: bytes) -> Header | None:
    """``decode_frame`` either raises ``DecodeError`` or returns a header that obeys its rules."""
    try:
        header, end = decode_frame(frame)
    except DecodeError:
        return None
    assert PREFIX.size < end <= len(frame)
    assert header.kind in set(Kind)
    assert isinstance(header.id, bytes) and len(header.id) == 16
    return header


def cert_or_refuse(raw: bytes) -> Certificate | None:
    try:
        cert, body, sig = Certificate.decode(raw)
    except DecodeError:
        return None
    assert cert.version == 1 and len(cert.sign_pk) == 32 and len(cert.box_pk) == 32
    assert len(sig) == 64 and isinstance(body, bytes)
    return cert


def record_or_refuse(raw: bytes) -> None:
    """``decode_record`` either raises a ``MeshError`` or returns a record."""
    with contextlib.suppress(MeshError):
        decode_record(raw, VERIFIER)


# --- frames ------------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=512))
@example(b"")
@example(MAGIC)
@example(PREFIX.pack(MAGIC, 0))
@example(PREFIX.pack(MAGIC, 0xFFFF) + b"\x80")
def test_decode_frame_of_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    """Arbitrary bytes decode or raise ``DecodeError``, nothing else."""
    decode_or_refuse(data)


@PROPERTY
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_decode_frame_of_arbitrary_header_bytes_raises_only_decode_error(
    header: bytes, body: bytes
) -> None:
    """Arbitrary header bytes behind a well-formed prefix raise only ``DecodeError``."""
    decode_or_refuse(_framed(header, body))


@PROPERTY
@given(flipped(FRAMES))
def test_decode_frame_of_flipped_frames_raises_only_decode_error(pair: tuple[bytes, bytes]) -> None:
    """Genuine frames with flipped bytes decode or raise ``DecodeError``."""
    decode_or_refuse(pair[1])


@PROPERTY
@given(truncated(FRAMES))
def test_decode_frame_of_truncated_frames_raises_only_decode_error(frame: bytes) -> None:
    """Genuine frames cut short decode or raise ``DecodeError``."""
    decode_or_refuse(frame)


@PROPERTY
@given(inserted(FRAMES))
def test_decode_frame_of_frames_with_inserted_bytes_raises_only_decode_error(frame: bytes) -> None:
    """Genuine frames with bytes inserted anywhere decode or raise ``DecodeError``."""
    decode_or_refuse(frame)


@STRUCTURED
@given(
    st.dictionaries(st.sampled_from(HEADER_KEYS) | st.text(max_size=4), TYPED, max_size=12) | VALUES
)
def test_decode_frame_of_random_header_maps_raises_only_decode_error(header: Any) -> None:
    """Msgpack maps of header keys and random values (or any value) behind the right prefix
    decode or raise ``DecodeError``."""
    decode_or_refuse(_framed(_packed(header), b"body"))


@STRUCTURED
@given(near_valid_maps([_header_map(f) for f in FRAMES], HEADER_KEYS, TYPED))
def test_decode_frame_of_near_valid_header_maps_raises_only_decode_error(
    header: dict[str, Any],
) -> None:
    """Genuine headers with fields dropped, retyped or added decode or raise ``DecodeError``."""
    decode_or_refuse(_framed(_packed(header)))


@STRUCTURED
@given(
    st.builds(
        Header,
        kind=st.sampled_from(list(Kind)),
        id=st.binary(min_size=16, max_size=16),
        ts=st.integers(0, 2**63 - 1),
        from_agent=st.text(max_size=20),
        from_instance=st.text(max_size=20),
        to_agent=st.text(max_size=20),
        to_instance=st.text(max_size=20),
        name=st.text(max_size=20),
        deadline=st.integers(0, 2**63 - 1),
        attempt=st.integers(0, 100),
        cert=st.binary(max_size=400),
        reply_to=st.binary(min_size=16, max_size=16),
        status=st.text(max_size=20),
        idempotency_key=st.none() | st.text(max_size=20),
        message=st.none() | st.text(max_size=40),
        end=st.none() | st.booleans(),
        stream=st.none() | st.integers(0, 2000),
        progress=st.none() | st.booleans(),
        op=st.text(max_size=10),
        credit=st.none() | st.integers(0, 2**31),
    ),
    st.binary(max_size=64),
)
def test_decode_frame_reads_back_what_encode_frame_writes(header: Header, body: bytes) -> None:
    """Every header the encoder writes decodes to an equal header and the same body offset."""
    frame, end = encode_frame(header, body)
    assert decode_frame(frame) == (header, end)


@PROPERTY
@given(flipped([REQUEST, REPLY]))
def test_sealed_frame_with_any_flipped_byte_never_opens(pair: tuple[bytes, bytes]) -> None:
    """The seal covers prefix, header and body: any flipped byte is refused, never opened."""
    _original, frame = pair
    with pytest.raises(MeshError):
        _header, end = decode_frame(frame)
        open_body(PAIR_KEY, frame[:end], frame[end:])


@PROPERTY
@given(flipped([EVENT]))
def test_signed_event_with_any_flipped_byte_never_verifies(pair: tuple[bytes, bytes]) -> None:
    """The event signature covers every byte before it: any flipped byte is refused."""
    _original, frame = pair
    with pytest.raises(MeshError):
        decode_frame(frame)
        verify_frame(ALICE.keys.sign_pk, frame)


def _frame_with_extra(extra: dict[str, Any]) -> bytes:
    header = _header_map(REFUSAL)
    header.update(extra)
    return _framed(_packed(header))


@pytest.mark.parametrize(
    "extra",
    [
        {"x-array": [1, 2, 3]},
        {f"x{i}": i for i in range(21)},
        {"x-map": {f"y{i}": i for i in range(22)}},
    ],
    ids=["array-value", "over-21-entries", "nested-map-over-21-entries"],
)
def test_header_with_unknown_fields_of_any_type_decodes(extra: dict[str, Any]) -> None:
    """Unknown header keys are ignored whatever they hold, so later versions can add fields
    (protocol.md, Decoding rules); the seal still covers their bytes."""
    header, _ = decode_frame(_frame_with_extra(extra))
    assert header.kind == Kind.REFUSAL


@pytest.mark.parametrize("key", ["msg", "tp", "ik"])
def test_header_with_nil_for_an_optional_key_reads_as_absent(key: str) -> None:
    """A known optional header key sent as msgpack ``nil`` is the same as leaving it out."""
    header, _ = decode_frame(_frame_with_extra({key: None}))
    attr = {"msg": "message", "tp": "traceparent", "ik": "idempotency_key"}[key]
    assert getattr(header, attr) is None


# --- certificates ------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=512))
def test_certificate_decode_of_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    """Arbitrary bytes decode as a certificate or raise ``DecodeError``."""
    cert_or_refuse(data)


@STRUCTURED
@given(mutated([CERT]))
def test_certificate_decode_of_mutated_certificates_raises_only_decode_error(raw: bytes) -> None:
    """A genuine certificate after flips, cuts, insertions or deletions decodes or refuses."""
    cert_or_refuse(raw)


@STRUCTURED
@given(
    near_valid_maps([CERT_BODY], CERT_KEYS, TYPED) | VALUES,
    st.binary(min_size=64, max_size=64) | VALUES,
)
def test_certificate_decode_of_random_body_maps_raises_only_decode_error(
    body: Any, sig: Any
) -> None:
    """``[body, signature]`` with a near-valid random body map (or any value), and any value
    alone, decode as a certificate or raise ``DecodeError``."""
    cert_or_refuse(_packed([_packed(body), sig]))
    cert_or_refuse(_packed(body))


@PROPERTY
@given(flipped([CERT]))
def test_certificate_with_any_flipped_byte_never_verifies(pair: tuple[bytes, bytes]) -> None:
    """The root signature binds the certificate: a flipped byte never verifies."""
    _original, raw = pair
    with pytest.raises(MeshError):
        VERIFIER.verify(raw)


# --- directory records -------------------------------------------------------------------------


RECORD_VALUES = (
    FINITE_VALUES
    | st.just(CERT)
    | st.just(BOB.certificate.raw)
    | TYPED.filter(lambda v: not isinstance(v, float))
)


@PROPERTY
@given(st.binary(max_size=512))
def test_decode_record_of_arbitrary_bytes_raises_only_mesh_errors(data: bytes) -> None:
    """Arbitrary bytes decode as a directory record or raise a ``MeshError``."""
    record_or_refuse(data)


@STRUCTURED
@given(mutated([RECORD]))
def test_decode_record_of_mutated_records_raises_only_mesh_errors(raw: bytes) -> None:
    """A genuine record after flips, truncations, insertions or deletions only raises MeshError."""
    record_or_refuse(raw)


@PROPERTY
@given(flipped([RECORD]))
def test_record_with_any_flipped_byte_never_verifies(pair: tuple[bytes, bytes]) -> None:
    """The instance signature binds the record: a flipped byte never yields a record."""
    _original, raw = pair
    with pytest.raises(MeshError):
        decode_record(raw, VERIFIER)


@STRUCTURED
@given(
    near_valid_maps([RECORD_BODY], RECORD_KEYS, RECORD_VALUES) | FINITE_VALUES,
    st.binary(min_size=64, max_size=64)
    | _leaves(finite=True).filter(lambda v: type(v) is not bytes),
)
def test_decode_record_of_random_record_maps_raises_only_mesh_errors(body: Any, sig: Any) -> None:
    """Random record bodies (finite ``ts``, 64-byte or non-binary signature) raise ``MeshError``.

    Infinite timestamps and signatures of another length are the tests below.
    """
    record_or_refuse(_packed([_packed(body), sig]))
    record_or_refuse(_packed(body))


@pytest.mark.parametrize("ts", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_record_with_infinite_timestamp_raises_only_mesh_errors(ts: float) -> None:
    """A record whose ``ts`` is an infinite float is refused with a ``MeshError``."""
    body = dict(RECORD_BODY, ts=ts)
    with pytest.raises(MeshError):
        decode_record(_packed([_packed(body), bytes(64)]), VERIFIER)


@pytest.mark.parametrize("length", [0, 63, 65], ids=["empty", "short", "long"])
def test_record_with_signature_of_wrong_length_raises_only_mesh_errors(length: int) -> None:
    """A genuine record body whose signature is not 64 bytes is refused with a ``MeshError``."""
    body, sig = msgpack.unpackb(RECORD)
    with pytest.raises(MeshError):
        decode_record(_packed([body, (sig * 2)[:length]]), VERIFIER)


def _nested(depth: int) -> bytes:
    """A msgpack list nested ``depth`` deep (msgpack itself unpacks up to 1024)."""
    return b"\x91" * depth + b"\xc0"


def test_record_with_deeply_nested_field_raises_only_mesh_errors() -> None:
    """A record whose ``version`` is a 1000-deep nested list is refused with a ``MeshError``."""
    head = _packed({k: v for k, v in RECORD_BODY.items() if k != "version"})
    # add the nested value as one more map entry: bump the fixmap count, append key and value
    count = head[0] & 0x0F
    body = bytes([0x80 | (count + 1)]) + head[1:] + _packed("version") + _nested(1000)
    assert msgpack.unpackb(body)["version"] is not None
    raw = _packed([body, bytes(64)])
    with pytest.raises(MeshError):
        decode_record(raw, VERIFIER)
