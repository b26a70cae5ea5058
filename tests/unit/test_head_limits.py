"""The signed head's refusals, each fed the input it refuses and checked for its type and
message, and its limits on both sides (``docs/protocol.md`` §26)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from mesh._core.head import (
    HEAD_TYPE,
    MAX_REVOKED,
    Head,
    audit_matches,
    check_successor,
    decode_head,
    encode_head,
    live_revocations,
)
from mesh._core.identity import TrustRoot
from mesh._core.signed import sign_document
from mesh.errors import DecodeError, Unauthenticated

ROOT = TrustRoot.generate()


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": HEAD_TYPE,
        "prefix": "mesh",
        "version": 1,
        "issued_at": 1_000_000,
        "expires_at": 1_120_000,
        "policy": [2, "ab" * 32],
        "revoked": [["s", 5]],
        "audit": [3, "cd" * 32],
    }
    body.update(changes)
    return body


def _decode(**changes: Any) -> Head:
    return decode_head(sign_document(_body(**changes), ROOT.sign), ROOT.public_key, "mesh")


class TestDecode:
    def test_fields_read_back(self) -> None:
        """Times are milliseconds on the wire and seconds in the head."""
        head = _decode()

        assert (head.version, head.issued_at, head.expires_at) == (1, 1000.0, 1120.0)
        assert (head.policy_revision, head.policy_sha256) == (2, "ab" * 32)
        assert head.revoked == (("s", 5),)
        assert (head.audit_length, head.audit_hash) == (3, "cd" * 32)

    def test_encode_writes_milliseconds_and_sorted_revocations(self) -> None:
        """encode_head writes times in ms and revocations sorted, and decodes back."""
        head = Head("mesh", 4, 1.5, 2.25, revoked=(("b", 2), ("a", 1)))

        decoded = decode_head(encode_head(head, ROOT.sign), ROOT.public_key, "mesh")

        assert decoded == replace(head, revoked=(("a", 1), ("b", 2)))

    def test_not_a_head(self) -> None:
        """Another signed document is a DecodeError naming its type."""
        with pytest.raises(DecodeError, match=r"document is not a head \(type 'mesh.policy'\)$"):
            _decode(type="mesh.policy")

    def test_another_prefix(self) -> None:
        """A head for another prefix is Unauthenticated naming both prefixes."""
        with pytest.raises(Unauthenticated, match=r"prefix 'other', not 'mesh'$"):
            _decode(prefix="other")

    def test_not_signed_by_the_root(self) -> None:
        """A head signed by another key is Unauthenticated."""
        raw = sign_document(_body(), TrustRoot.generate().sign)

        with pytest.raises(Unauthenticated, match=r"head is not signed by this mesh's trust root$"):
            decode_head(raw, ROOT.public_key, "mesh")

    @pytest.mark.parametrize(
        "policy", [[2], [2, "x", 3], ["2", "x"], [2, b"x"], [True, "x"], "2:x", 2], ids=repr
    )
    def test_malformed_policy(self, policy: Any) -> None:
        """A policy that is not [revision, sha256] or nil is a DecodeError."""
        with pytest.raises(DecodeError, match=r"'policy' must be \[revision, sha256\] or nil$"):
            _decode(policy=policy)

    def test_no_policy(self) -> None:
        """A nil policy is a head without policy."""
        head = _decode(policy=None)

        assert (head.policy_revision, head.policy_sha256) == (None, None)
        assert "no policy" in head.describe()

    @pytest.mark.parametrize(
        "revoked",
        [["s"], [["s"]], [["s", 1, 2]], [[1, 1]], [["s", "1"]], [["s", True]], [("s",)]],
        ids=repr,
    )
    def test_malformed_revocations(self, revoked: Any) -> None:
        """Revocations that are not [serial, not_after] pairs are a DecodeError."""
        with pytest.raises(
            DecodeError, match=r"'revoked' must be a list of \[serial, not_after\]$"
        ):
            _decode(revoked=revoked)

    def test_revocations_bounded(self) -> None:
        """MAX_REVOKED revocations are read; one more is a DecodeError."""
        many = [[f"{i:x}", 1] for i in range(MAX_REVOKED)]
        assert len(_decode(revoked=many).revoked) == MAX_REVOKED == 100_000

        with pytest.raises(DecodeError, match="'revoked' must be a list"):
            _decode(revoked=[*many, ["x", 1]])

    @pytest.mark.parametrize("audit", [[3], [3, "x", 1], ["3", "x"], [3, b"x"], [True, "x"]])
    def test_malformed_audit(self, audit: Any) -> None:
        """An audit that is not [length, sha256] is a DecodeError."""
        with pytest.raises(DecodeError, match=r"'audit' must be \[length, sha256\]$"):
            _decode(audit=audit)

    @pytest.mark.parametrize(
        "changes",
        [{"version": 0}, {"version": -1}, {"expires_at": 999_999}, {"audit": [-1, ""]}],
        ids=repr,
    )
    def test_impossible_values(self, changes: dict[str, Any]) -> None:
        """Version 0, expiry before issue or a negative audit length is a DecodeError."""
        with pytest.raises(DecodeError, match=r"impossible version, expiry or audit length$"):
            _decode(**changes)

    def test_smallest_possible_values(self) -> None:
        """Version 1, expiry at issue time and an empty audit chain are accepted."""
        head = _decode(version=1, expires_at=1_000_000, audit=[0, ""])

        assert (head.version, head.expires_at, head.audit_length) == (1, 1000.0, 0)


class TestHeadAndSuccessor:
    HEAD = Head("mesh", 3, 1000.0, 1120.0, policy_revision=2, policy_sha256="ab")

    def test_expires_after_expires_at(self) -> None:
        """A head is expired only after expires_at, not at it."""
        assert not self.HEAD.expired(1120.0)
        assert self.HEAD.expired(1120.001)

    def test_describe(self) -> None:
        """describe names the version, the policy, the revocations and the audit length."""
        head = replace(self.HEAD, revoked=(("a", 1), ("b", 2)), audit_length=7)

        assert head.describe() == "head v3 (policy revision 2, 2 revoked, 7 audit records)"
        assert head.revoked_serials == frozenset({"a", "b"})

    def test_newer_or_same_head_accepted(self) -> None:
        """A newer head, or the very same one, follows; even an expired one once one was seen."""
        newer = replace(self.HEAD, version=4)

        assert check_successor(self.HEAD, newer, now=5000.0) is None
        assert check_successor(self.HEAD, self.HEAD, now=5000.0) is None

    def test_older_head_is_a_rollback(self) -> None:
        """An older version is refused as a rollback, naming both versions."""
        older = replace(self.HEAD, version=2)

        assert check_successor(self.HEAD, older, now=0) == (
            "head v2 is older than v3 already seen (a rollback: the store was rewritten)"
        )

    def test_same_version_other_content(self) -> None:
        """Two heads of one version with different content are refused."""
        other = replace(self.HEAD, audit_length=1)

        assert check_successor(self.HEAD, other, now=0) == "two different heads carry version 3"

    def test_first_head_must_be_current(self) -> None:
        """With no head seen, an expired head is refused (saying for how long) and a current
        one accepted, up to expires_at itself."""
        assert check_successor(None, self.HEAD, now=1120.0) is None
        assert check_successor(None, self.HEAD, now=1150.0) == (
            "head v3 expired 30 s ago and this agent has seen no head to compare it with"
        )

    def test_live_revocations_drop_expired_ones(self) -> None:
        """Revocations whose certificate expired by now drop out; the rest come sorted, once."""
        revoked = [("b", 200), ("a", 300), ("c", 100), ("b", 200)]

        assert live_revocations(revoked, now=100) == (("a", 300), ("b", 200))
        assert live_revocations(revoked, now=99) == (("a", 300), ("b", 200), ("c", 100))

    def test_audit_matches(self) -> None:
        """An empty chain always matches; otherwise the record must exist and hash right."""
        record = b"record"
        head = replace(self.HEAD, audit_length=1, audit_hash=hashlib.sha256(record).hexdigest())

        assert audit_matches(replace(head, audit_length=0), None)
        assert audit_matches(head, record)
        assert not audit_matches(head, None)
        assert not audit_matches(head, b"other")
