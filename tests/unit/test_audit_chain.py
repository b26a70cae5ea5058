"""The audit log's hash chain (pure): every edit, removal or reordering is reported."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import pytest

from mesh._runtime.control import sign_document
from mesh.control_plane import AuditRecord, TrustRoot, verify_audit_chain

ROOT = TrustRoot.generate()


def chain(n: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    prev = ""
    for seq in range(1, n + 1):
        body = asdict(AuditRecord(kind="policy.applied", actor="admin/x", subject=f"r{seq}"))
        body.pop("seq")
        body["prev"] = prev
        raw = sign_document(ROOT, body)
        out.append((seq, raw))
        prev = hashlib.sha256(raw).hexdigest()
    return out


def test_intact_chain_verifies() -> None:
    """A chain written in order verifies with no problem."""
    records, problems = verify_audit_chain(chain(5), ROOT.public_key, last_seq=5)
    assert problems == [] and [r.subject for r in records] == ["r1", "r2", "r3", "r4", "r5"]


def test_edited_record_is_caught() -> None:
    """Changing one byte of a record breaks its signature (and the next link)."""
    entries = chain(4)
    seq, raw = entries[1]
    edited = raw.replace(b"r2", b"rX")
    entries[1] = (seq, edited)
    _, problems = verify_audit_chain(entries, ROOT.public_key, last_seq=4)
    assert any("record 2" in p and "edited or forged" in p for p in problems)
    assert any("record 3 does not link" in p for p in problems)


@pytest.mark.parametrize("removed", [0, 2, 4])
def test_removed_record_is_caught_anywhere(removed: int) -> None:
    """A record removed at the start, in the middle or at the end leaves a reported gap."""
    entries = chain(5)
    del entries[removed]
    _, problems = verify_audit_chain(entries, ROOT.public_key, last_seq=5)
    assert any("missing (removed)" in p for p in problems)


def test_reordered_records_are_caught() -> None:
    """Swapping two records' places breaks the links."""
    entries = chain(4)
    (s2, r2), (s3, r3) = entries[1], entries[2]
    entries[1], entries[2] = (s2, r3), (s3, r2)
    _, problems = verify_audit_chain(entries, ROOT.public_key, last_seq=4)
    assert any("does not link" in p for p in problems)


def test_record_signed_by_another_root_is_forged() -> None:
    """A well-formed record signed by another key is reported as forged."""
    entries = chain(2)
    other = TrustRoot.generate()
    body = asdict(AuditRecord(kind="x", actor="y", subject="z"))
    body.pop("seq")
    body["prev"] = hashlib.sha256(entries[-1][1]).hexdigest()
    entries.append((3, sign_document(other, body)))
    _, problems = verify_audit_chain(entries, ROOT.public_key, last_seq=3)
    assert problems == [
        "record 3: document is not signed by this mesh's trust root (edited or forged)"
    ]
