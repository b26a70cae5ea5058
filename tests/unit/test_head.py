"""The signed head (pure core): encoding, strict decoding, and which head may follow which."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack
import pytest

from mesh import DecodeError, Unauthenticated
from mesh._core.head import (
    Head,
    audit_matches,
    check_successor,
    decode_head,
    encode_head,
    live_revocations,
)
from mesh._core.identity import TrustRoot
from mesh._core.signed import sign_document

ROOT = TrustRoot.generate()
HEAD = Head(
    prefix="mesh",
    version=3,
    issued_at=1000.0,
    expires_at=1120.0,
    policy_revision=2,
    policy_sha256="ab" * 32,
    revoked=(("a" * 32, 2000),),
    audit_length=5,
    audit_hash="cd" * 32,
)


def test_a_head_round_trips() -> None:
    """What the registry signs is what an agent reads."""
    assert decode_head(encode_head(HEAD, ROOT.sign), ROOT.public_key, "mesh") == HEAD


def test_a_head_without_policy_round_trips() -> None:
    """``policy`` is nil before any apply."""
    head = replace(HEAD, policy_revision=None, policy_sha256=None)
    assert decode_head(encode_head(head, ROOT.sign), ROOT.public_key, "mesh") == head


def test_a_head_of_another_root_or_prefix_is_refused() -> None:
    """Another key's head, or this mesh's head read under another prefix, is refused."""
    with pytest.raises(Unauthenticated, match="trust root"):
        decode_head(encode_head(HEAD, TrustRoot.generate().sign), ROOT.public_key, "mesh")
    with pytest.raises(Unauthenticated, match="prefix"):
        decode_head(encode_head(HEAD, ROOT.sign), ROOT.public_key, "mesh2")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "mesh.policy"),
        ("version", 0),
        ("version", True),
        ("policy", [2]),
        ("policy", ["2", "ab"]),
        ("revoked", [["a", "2000"]]),
        ("audit", [5]),
        ("audit", [-1, ""]),
        ("expires_at", 999_000),
    ],
)
def test_malformed_fields_are_refused(field: str, value: object) -> None:
    """Every field is checked for its exact type and sense: anything else is not a head."""
    body = msgpack.unpackb(msgpack.unpackb(encode_head(HEAD, ROOT.sign))[0])
    body[field] = value
    with pytest.raises(DecodeError):
        decode_head(sign_document(body, ROOT.sign), ROOT.public_key, "mesh")


def test_an_older_head_is_a_rollback() -> None:
    """A version below the one seen is refused, expired or not."""
    why = check_successor(HEAD, replace(HEAD, version=2), now=1001.0)
    assert why is not None and "rollback" in why


def test_the_same_version_with_other_content_is_refused() -> None:
    """Versions are never reused."""
    assert check_successor(HEAD, replace(HEAD, policy_revision=9), now=1001.0) is not None
    assert check_successor(HEAD, HEAD, now=1001.0) is None


def test_an_expired_head_needs_something_to_compare_with() -> None:
    """With no head seen, an expired one cannot be told from an old one; after one was seen,
    a head not older than it is accepted even when expired (the reader is then stale)."""
    late = 1200.0
    assert check_successor(None, HEAD, now=late) is not None
    assert check_successor(None, HEAD, now=1001.0) is None
    assert check_successor(HEAD, replace(HEAD, version=4), now=late) is None


def test_expired_revocations_leave_the_head() -> None:
    """A revoked certificate past its not_after cannot be used: it drops out (sorted)."""
    assert live_revocations([("b", 50), ("a", 10), ("b", 50)], now=20) == (("b", 50),)


def test_audit_matches_the_record_it_counts() -> None:
    """The head counts the record at its length by hash; an empty count matches anything."""
    record = b"record five"
    head = replace(HEAD, audit_hash=hashlib.sha256(record).hexdigest())
    assert audit_matches(head, record)
    assert not audit_matches(head, b"another record")
    assert not audit_matches(head, None)
    assert audit_matches(replace(head, audit_length=0), None)
