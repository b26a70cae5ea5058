"""Property tests that invalid inputs are refused, and refused for the right reason: each draws
inputs that break one rule and asserts the refusal's type and message (the decoder property
tests in ``tests/security`` check that nothing else escapes; these check what is refused)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh._core.crypto import ReplayGuard
from mesh._core.envelope import _FIELDS, _REQUIRED, MAGIC, PREFIX_LEN, Kind, decode_frame
from mesh._core.identity import Certificate
from mesh._core.ratelimit import TokenBucket
from mesh.errors import DecodeError, InvalidArgument, Unauthenticated
from mesh.testing import FakeClock

SETTINGS = settings(max_examples=100, deadline=None)
KEY = bytes(range(32))
_VALUE = {
    int: st.integers(min_value=0, max_value=2**40),
    bytes: st.binary(min_size=16, max_size=16),
    str: st.text(min_size=1, max_size=8),
    bool: st.booleans(),
}
# a value of each msgpack type, to pick wrong ones from
_ANY = {
    int: st.integers(-(2**40), 2**40),
    bytes: st.binary(max_size=8),
    str: st.text(max_size=8),
    bool: st.booleans(),
    float: st.floats(allow_nan=False),
    list: st.lists(st.integers(-(2**40), 2**40), max_size=2),
    dict: st.dictionaries(st.text(max_size=2), st.integers(-(2**40), 2**40), max_size=2),
}


def _frame(header: Any) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">2sH", MAGIC, len(hb)) + hb


@st.composite
def _valid_map(draw: st.DrawFn, kind: Kind | None = None) -> dict[str, Any]:
    """A header map with every field its kind requires."""
    kind = draw(st.sampled_from(list(Kind))) if kind is None else kind
    m: dict[str, Any] = {"k": int(kind)}
    for attr in _REQUIRED[kind]:
        key, typ = _FIELDS[attr]
        m[key] = draw(_VALUE[typ])
    return m


@SETTINGS
@given(st.data())
def test_missing_required_fields_named(data: st.DataObject) -> None:
    """Removing any required fields is refused naming the first missing one in field order."""
    kind = data.draw(st.sampled_from(list(Kind)))
    m = data.draw(_valid_map(kind))
    required = [a for a in _FIELDS if a in _REQUIRED[kind]]
    dropped = data.draw(st.sets(st.sampled_from(required), min_size=1))
    for attr in dropped:
        if data.draw(st.booleans()):
            del m[_FIELDS[attr][0]]
        else:
            m[_FIELDS[attr][0]] = None
    first = next(a for a in required if a in dropped)

    with pytest.raises(DecodeError) as ei:
        decode_frame(_frame(m))

    assert ei.value.message == f"header field {_FIELDS[first][0]!r} missing for kind {int(kind)}"


@SETTINGS
@given(st.data())
def test_field_of_wrong_type_named(data: st.DataObject) -> None:
    """A known field holding a value of another type is refused naming the field and type."""
    m = data.draw(_valid_map())
    attr = data.draw(st.sampled_from(list(_FIELDS)))
    key, typ = _FIELDS[attr]
    wrong = data.draw(st.sampled_from([t for t in _ANY if t is not typ]))
    m[key] = data.draw(_ANY[wrong])

    with pytest.raises(DecodeError) as ei:
        decode_frame(_frame(m))

    assert ei.value.message == f"header field {key!r} must be {typ.__name__}"


@SETTINGS
@given(_valid_map(), st.binary(max_size=40).filter(lambda b: len(b) != 16))
def test_message_id_not_16_bytes(m: dict[str, Any], msg_id: bytes) -> None:
    """A message id of any length but 16 is refused."""
    m["id"] = msg_id

    with pytest.raises(DecodeError, match=r"message id must be 16 bytes$"):
        decode_frame(_frame(m))


@SETTINGS
@given(_valid_map(), st.integers(-(2**63), 2**64 - 1).filter(lambda k: k not in (1, 2, 3, 4)))
def test_unknown_kind(m: dict[str, Any], kind: int) -> None:
    """Any kind number but 1 to 4 is refused naming it."""
    m["k"] = kind

    with pytest.raises(DecodeError, match=rf"unknown frame kind {kind}$"):
        decode_frame(_frame(m))


@SETTINGS
@given(st.binary(max_size=PREFIX_LEN - 1))
def test_shorter_than_the_prefix(frame: bytes) -> None:
    """Anything shorter than 4 bytes is refused as such."""
    with pytest.raises(DecodeError, match=r"frame shorter than its 4-byte prefix$"):
        decode_frame(frame)


@SETTINGS
@given(st.binary(min_size=2, max_size=2).filter(lambda m: m != MAGIC), st.binary(max_size=64))
def test_other_magic_or_version(magic: bytes, rest: bytes) -> None:
    """Any first two bytes but 0x4D 0x01 are refused as another format or version."""
    with pytest.raises(DecodeError, match=r"not a mesh v1 frame \(bad magic or version\)$"):
        decode_frame(magic + b"\x00\x05" + rest)


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 65535))
def test_header_length_past_the_frame(rest: bytes, hlen: int) -> None:
    """A header length of 0, or larger than what follows the prefix, is refused."""
    if 0 < hlen <= len(rest):
        hlen = len(rest) + 1
    with pytest.raises(DecodeError, match=r"header length out of range$"):
        decode_frame(MAGIC + struct.pack(">H", hlen) + rest)


def _cert(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "agent": "a",
        "box_pk": KEY,
        "instance": "i",
        "issuer": "x",
        "not_after": 2,
        "not_before": 1,
        "roles": [],
        "serial": "s",
        "sign_pk": KEY,
        "version": 1,
    }
    body.update(changes)
    raw: bytes = msgpack.packb(
        [msgpack.packb(body, use_bin_type=True), bytes(64)], use_bin_type=True
    )
    return raw


@SETTINGS
@given(st.lists(st.text(max_size=4)), st.integers(0, 5), _ANY[int] | _ANY[bytes] | _ANY[list])
def test_certificate_role_not_a_string(roles: list[str], at: int, bad: Any) -> None:
    """A role list with anything but strings in it is refused."""
    roles.insert(min(at, len(roles)), bad)

    with pytest.raises(DecodeError, match=r"certificate roles must be a list of strings$"):
        Certificate.decode(_cert(roles=roles))


@SETTINGS
@given(st.integers(-(2**31), 2**31).filter(lambda v: v != 1))
def test_certificate_version_other_than_1(version: int) -> None:
    """Any certificate version but 1 is refused naming it."""
    with pytest.raises(DecodeError, match=rf"unsupported certificate version {version}$"):
        Certificate.decode(_cert(version=version))


@SETTINGS
@given(
    st.sampled_from(["sign_pk", "box_pk"]),
    st.binary(max_size=64).filter(lambda b: len(b) != 32),
)
def test_certificate_key_not_32_bytes(field: str, key: bytes) -> None:
    """A signing or box key of any length but 32 is refused."""
    with pytest.raises(DecodeError, match=r"certificate keys must be 32 bytes$"):
        Certificate.decode(_cert(**{field: key}))


@SETTINGS
@given(
    st.floats(min_value=1, max_value=120),
    st.integers(1, 10**6),
    st.sampled_from(["past", "future"]),
)
def test_replay_window_refusals(window: float, by_ms: int, side: str) -> None:
    """A timestamp any amount outside the window, or beyond the skew, is refused saying
    which."""
    now = 1_700_000_000.0
    guard = ReplayGuard(window, max_future=5, clock=FakeClock(now))
    now_ms = int(now * 1000)
    if side == "past":
        with pytest.raises(Unauthenticated, match=r"older than the replay window$"):
            guard.check(bytes(16), now_ms - guard.window_ms - by_ms)
    else:
        with pytest.raises(Unauthenticated, match=r"dated in the future beyond the allowed skew$"):
            guard.check(bytes(16), now_ms + 5000 + by_ms)


@SETTINGS
@given(st.floats(max_value=0) | st.sampled_from([math.inf, -math.inf, math.nan]))
def test_bucket_rate_not_positive_and_finite(rate: float) -> None:
    """A token bucket rate that is not a positive finite number is refused naming it."""
    with pytest.raises(InvalidArgument, match=r"token bucket rate must be > 0, got "):
        TokenBucket(rate, 1)


@SETTINGS
@given(st.integers(max_value=0))
def test_bucket_burst_below_one(burst: int) -> None:
    """A burst below 1 is refused naming it."""
    with pytest.raises(InvalidArgument, match=rf"token bucket burst must be >= 1, got {burst}$"):
        TokenBucket(1.0, burst)


@SETTINGS
@given(
    st.floats(min_value=0.1, max_value=100),
    st.integers(1, 20),
    st.lists(st.floats(min_value=0, max_value=2), max_size=60),
)
def test_bucket_never_gives_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[float]
) -> None:
    """Over any run, the tokens taken are at most burst + rate * elapsed, and a refusal
    means fewer than one token is there, with a positive retry_after."""
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate, burst, clock=clock)
    taken = 0
    for step in steps:
        clock.advance(step)
        while bucket.try_take():
            taken += 1
        assert taken <= burst + rate * clock.now + 1e-6
        assert bucket.tokens < 1.0
        assert not bucket.available()
        assert bucket.retry_after() == pytest.approx((1.0 - bucket.tokens) / rate)
        assert bucket.retry_after() > 0
