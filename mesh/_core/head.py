"""The signed head: the registry's statement of what the control plane's current state is.

Signatures say who wrote a document, not whether it is the newest: a broker that keeps old
signed documents can put them back, delete the newest, or freeze what an agent sees. The head
closes that gap, like The Update Framework's timestamp and snapshot roles and Certificate
Transparency's signed tree heads (``docs/protocol.md`` section 26). It names the current policy
revision by number and hash, lists the live revocations, and counts the audit chain, under a
version that only grows and an expiry. An agent runs only the policy the newest head names,
refuses any head older than one it has seen, and reports itself stale once its head expired.

Pure core: ``mesh._runtime.freshness`` signs, stores and watches heads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh._core.signed import open_document, sign_document, typed_field, verify_document
from mesh.errors import DecodeError, Unauthenticated

__all__ = [
    "HEAD_TYPE",
    "Head",
    "audit_matches",
    "check_successor",
    "decode_head",
    "encode_head",
    "live_revocations",
]

HEAD_TYPE = "mesh.head.v1"
MAX_REVOKED = 100_000


@dataclass(frozen=True, slots=True)
class Head:
    """A verified head.

    Attributes:
        prefix: the mesh's subject prefix (a head of one mesh means nothing in another).
        version: grows by one with every head the registry signs; never reused.
        issued_at / expires_at: unix seconds; past ``expires_at`` the head is stale.
        policy_revision / policy_sha256: the current policy revision and the SHA-256 of its
            canonical JSON, or ``None`` before any policy was applied.
        revoked: ``(serial, not_after)`` of every revoked certificate still within its life.
        audit_length / audit_hash: the audit chain's last sequence and the SHA-256 of that
            record's bytes (``0`` and ``""`` for an empty chain).
    """

    prefix: str
    version: int
    issued_at: float
    expires_at: float
    policy_revision: int | None = None
    policy_sha256: str | None = None
    revoked: tuple[tuple[str, int], ...] = field(default=())
    audit_length: int = 0
    audit_hash: str = ""

    def expired(self, now: float) -> bool:
        return now > self.expires_at

    @property
    def revoked_serials(self) -> frozenset[str]:
        return frozenset(serial for serial, _ in self.revoked)

    def describe(self) -> str:
        policy = (
            f"policy revision {self.policy_revision}"
            if self.policy_revision is not None
            else "no policy"
        )
        return (
            f"head v{self.version} ({policy}, {len(self.revoked)} revoked, "
            f"{self.audit_length} audit records)"
        )


def encode_head(head: Head, sign: Callable[[bytes], bytes]) -> bytes:
    """Sign ``head`` with the trust root's ``sign``: a signed document (section 25)."""
    body: dict[str, Any] = {
        "type": HEAD_TYPE,
        "prefix": head.prefix,
        "version": head.version,
        "issued_at": int(head.issued_at * 1000),
        "expires_at": int(head.expires_at * 1000),
        "policy": None
        if head.policy_revision is None
        else [head.policy_revision, head.policy_sha256],
        "revoked": [[s, n] for s, n in sorted(head.revoked)],
        "audit": [head.audit_length, head.audit_hash],
    }
    return sign_document(body, sign)


def decode_head(raw: bytes, root_public_key: bytes, prefix: str) -> Head:
    """Verify and parse a head.

    Raises:
        DecodeError: malformed, or another kind of document.
        Unauthenticated: not signed by the trust root, or a head of another prefix.
    """
    what = "head"
    body, packed, sig = open_document(raw, what)
    verify_document(packed, sig, root_public_key, "head is not signed by this mesh's trust root")
    if body.get("type") != HEAD_TYPE:
        raise DecodeError(f"document is not a head (type {body.get('type')!r})")
    head_prefix = typed_field(body, "prefix", str, what)
    if head_prefix != prefix:
        raise Unauthenticated(f"head is for the mesh prefix {head_prefix!r}, not {prefix!r}")
    version = typed_field(body, "version", int, what)
    issued = typed_field(body, "issued_at", int, what)
    expires = typed_field(body, "expires_at", int, what)
    policy = body.get("policy")
    rev: int | None = None
    sha: str | None = None
    if policy is not None:
        if not (
            isinstance(policy, list)
            and len(policy) == 2
            and type(policy[0]) is int
            and type(policy[1]) is str
        ):
            raise DecodeError("head field 'policy' must be [revision, sha256] or nil")
        rev, sha = policy
    revoked = typed_field(body, "revoked", list, what)
    if len(revoked) > MAX_REVOKED or not all(
        isinstance(r, list) and len(r) == 2 and type(r[0]) is str and type(r[1]) is int
        for r in revoked
    ):
        raise DecodeError("head field 'revoked' must be a list of [serial, not_after]")
    audit = typed_field(body, "audit", list, what)
    if not (len(audit) == 2 and type(audit[0]) is int and type(audit[1]) is str):
        raise DecodeError("head field 'audit' must be [length, sha256]")
    if version < 1 or expires < issued or audit[0] < 0:
        raise DecodeError("head has an impossible version, expiry or audit length")
    return Head(
        prefix=head_prefix,
        version=version,
        issued_at=issued / 1000.0,
        expires_at=expires / 1000.0,
        policy_revision=rev,
        policy_sha256=sha,
        revoked=tuple((s, n) for s, n in revoked),
        audit_length=audit[0],
        audit_hash=audit[1],
    )


def check_successor(seen: Head | None, new: Head, now: float) -> str | None:
    """Whether ``new`` may replace ``seen``, the newest head this reader accepted (in memory
    or from its saved state).

    Returns:
        ``None`` to accept, else why it is refused.
    """
    if seen is not None:
        if new.version < seen.version:
            return (
                f"head v{new.version} is older than v{seen.version} already seen "
                "(a rollback: the store was rewritten)"
            )
        if new.version == seen.version and new != seen:
            return f"two different heads carry version {new.version}"
        return None  # not older: accepted even when expired (then the reader is stale)
    if new.expired(now):
        # Without a saved head nothing tells an old head from the current one: wait for a
        # fresh one (the registry re-signs on a schedule).
        return (
            f"head v{new.version} expired {now - new.expires_at:.0f} s ago and this agent has "
            "seen no head to compare it with"
        )
    return None


def live_revocations(revoked: Iterable[tuple[str, int]], now: float) -> tuple[tuple[str, int], ...]:
    """The revocations of certificates still within their life, sorted (expired ones can no
    longer be used and drop out of the head)."""
    return tuple(sorted({(s, n) for s, n in revoked if n > now}))


def audit_matches(head: Head, record_at_length: bytes | None) -> bool:
    """Whether the audit chain holds the record ``head`` counts: ``record_at_length`` is the
    record at sequence ``head.audit_length`` (``None`` when missing)."""
    if head.audit_length == 0:
        return True
    return (
        record_at_length is not None
        and hashlib.sha256(record_at_length).hexdigest() == head.audit_hash
    )
