"""The control plane's state in JetStream: documents the registry signs and every agent verifies.

=====================  ==========================  ===========================================
bucket / stream        key                         value (a signed document)
=====================  ==========================  ===========================================
``<p>-policy``         ``current`` (history 64)    ``PolicyRevision``
``<p>-certs``          certificate serial          ``IssuedCertificate``
``<p>-tokens``         SHA-256 of the join token   ``JoinToken`` (the token itself is never stored)
``<p>-revoked``        certificate serial          ``Revocation``
``<p>-audit`` stream   subject ``<p>.audit``       ``AuditRecord``, hash-chained
=====================  ==========================  ===========================================

A signed document is ``msgpack([body, signature])``: ``body`` is a msgpack map, ``signature``
the trust root's Ed25519 signature over it. The registry holds the root key (or, later, an
intermediate); agents hold only the public key, so nobody else can forge policy, revocations
or audit records, even with full access to NATS.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh._core import signed
from mesh._core.identity import TrustRoot
from mesh._core.names import audit_stream, audit_subject, store_bucket
from mesh._transport.base import KeyValueBucket, Stream, Transport
from mesh.errors import DecodeError, FailedPrecondition, MeshError, Unauthenticated

__all__ = [
    "AuditRecord",
    "ControlStore",
    "IssuedCertificate",
    "JoinToken",
    "PolicyRevision",
    "Revocation",
    "open_document",
    "sign_document",
    "verify_audit_chain",
]

POLICY_KEY = "current"
POLICY_HISTORY = 64


def sign_document(root: TrustRoot, body: dict[str, Any]) -> bytes:
    """Sign ``body`` with the trust root: ``msgpack([packed body, signature])``."""
    return signed.sign_document(body, root.sign)


def open_document(raw: bytes, root_public_key: bytes) -> dict[str, Any]:
    """Verify a signed document and return its body.

    Raises:
        DecodeError: malformed bytes.
        Unauthenticated: not signed by the trust root.
    """
    body, packed, sig = signed.open_document(raw, "signed document")
    signed.verify_document(
        packed, sig, root_public_key, "document is not signed by this mesh's trust root"
    )
    return body


def _fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    try:
        return {k: body[k] for k in names if k in body}
    except TypeError as exc:
        raise DecodeError(f"malformed {cls.__name__}") from exc


@dataclass(frozen=True, slots=True)
class PolicyRevision:
    """One applied policy: the canonical JSON of the policy and who applied it, when."""

    revision: int
    policy_json: bytes
    source: str
    applied_by: str
    applied_at: float
    rollback_of: int | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.policy_json).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """The registry's record of a certificate it issued."""

    serial: str
    agent: str
    instance: str
    roles: list[str]
    not_after: int
    issued_at: float
    via: str  # token, renewal, offline
    certificate: bytes = b""


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A one-time join token's grant (stored under the token's SHA-256, never in clear)."""

    agent: str
    roles: list[str]
    expires_at: float
    cert_ttl: float
    created_by: str
    used_at: float | None = None
    used_by_serial: str | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked certificate serial."""

    serial: str
    agent: str
    revoked_at: float
    revoked_by: str
    not_after: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the audit log; ``prev`` is the SHA-256 of the previous entry's bytes."""

    kind: str
    actor: str
    subject: str
    ts: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)
    prev: str = ""
    seq: int = 0  # the stream sequence, filled in when read


def verify_audit_chain(
    entries: list[tuple[int, bytes]],
    root_public_key: bytes,
    *,
    first_seq: int = 1,
    last_seq: int | None = None,
) -> tuple[list[AuditRecord], list[str]]:
    """Check every signature and every link of the chain.

    Args:
        entries: ``(stream sequence, bytes)`` in stream order.
        root_public_key: the trust root.
        first_seq: where ``entries`` should start (1: the whole log, whose first record
            links to nothing; later: a window whose first link is not checked).
        last_seq: the stream's last sequence, so removed records at the end show too.

    Returns:
        ``(records, problems)``: the records that verified, and one line per problem
        (a forged or edited record, a removed record, a broken link).
    """
    records: list[AuditRecord] = []
    problems: list[str] = []
    prev_hash: str | None = "" if first_seq <= 1 else None
    prev_seq = first_seq - 1
    for seq, raw in entries:
        if seq != prev_seq + 1:
            problems.append(f"records {prev_seq + 1}..{seq - 1} are missing (removed)")
        try:
            body = open_document(raw, root_public_key)
            record = AuditRecord(**{**_fields(AuditRecord, body), "seq": seq})
        except (MeshError, TypeError) as exc:
            msg = exc.message if isinstance(exc, MeshError) else str(exc)
            problems.append(f"record {seq}: {msg} (edited or forged)")
        else:
            if prev_hash is not None and record.prev != prev_hash:
                problems.append(
                    f"record {seq} does not link to record {prev_seq} "
                    "(a record was removed, reordered or edited)"
                )
            records.append(record)
        prev_hash = hashlib.sha256(raw).hexdigest()
        prev_seq = seq
    if last_seq is not None and last_seq > prev_seq:
        problems.append(f"records {prev_seq + 1}..{last_seq} are missing (removed)")
    return records, problems


class ControlStore:
    """Typed, verified access to the control plane's buckets and audit stream.

    Agents use the read and watch methods with a verify-only root; the registry, which holds
    the root key, also writes.

    Args:
        transport: a connected transport.
        prefix: the mesh's subject prefix.
        root: the trust root (public, or with the private key for writing).
        replicas: JetStream replicas when creating buckets (3 on a cluster).
    """

    def __init__(
        self, transport: Transport, prefix: str, root: TrustRoot, *, replicas: int = 1
    ) -> None:
        self.transport = transport
        self.prefix = prefix
        self.root = root
        self.replicas = replicas
        self._kv: dict[str, KeyValueBucket] = {}
        self._audit: Stream | None = None

    async def _bucket(self, name: str, history: int = 1) -> KeyValueBucket:
        kv = self._kv.get(name)
        if kv is None:
            kv = await self.transport.key_value(
                store_bucket(self.prefix, name), replicas=self.replicas, history=history
            )
            self._kv[name] = kv
        return kv

    def _open(self, raw: bytes) -> dict[str, Any]:
        return open_document(raw, self.root.public_key)

    # --- policy ------------------------------------------------------------------------------

    async def policy_bucket(self) -> KeyValueBucket:
        return await self._bucket("policy", POLICY_HISTORY)

    def decode_policy(self, raw: bytes) -> PolicyRevision:
        """Verify and parse a policy revision document.

        Raises:
            DecodeError / Unauthenticated: malformed, or not signed by the root.
        """
        body = self._open(raw)
        try:
            return PolicyRevision(**_fields(PolicyRevision, body))
        except TypeError as exc:
            raise DecodeError(f"malformed policy revision: {exc}") from None

    async def current_policy(self) -> tuple[PolicyRevision, int] | None:
        """The current revision and its KV revision (for compare-and-set), if any."""
        found = await (await self.policy_bucket()).entry(POLICY_KEY)
        if found is None:
            return None
        return self.decode_policy(found[0]), found[1]

    async def policy_history(self) -> list[PolicyRevision]:
        """Every kept revision, oldest first (forged entries are skipped)."""
        out = []
        for raw, _rev in await (await self.policy_bucket()).history(POLICY_KEY):
            if raw is None:
                continue
            try:
                out.append(self.decode_policy(raw))
            except MeshError:
                continue
        return out

    async def write_policy(self, rev: PolicyRevision, expect: int | None) -> None:
        """Store a new current revision; ``expect`` is the KV revision read before (CAS).

        Raises:
            FailedPrecondition: another registry applied a revision in between.
        """
        kv = await self.policy_bucket()
        raw = sign_document(self.root, asdict(rev))
        if expect is None:
            await kv.create(POLICY_KEY, raw)
        else:
            await kv.update(POLICY_KEY, raw, expect)

    async def watch_policy(self) -> AsyncIterator[bytes | None]:
        """Raw policy documents as they change (``None`` once the current one was delivered)."""
        async for item in (await self.policy_bucket()).watch():
            if item is None:
                yield None
            elif item[0] == POLICY_KEY and item[1] is not None:
                yield item[1]

    # --- certificates, tokens, revocations ---------------------------------------------------

    async def record_certificate(self, cert: IssuedCertificate) -> None:
        await (await self._bucket("certs")).put(cert.serial, sign_document(self.root, asdict(cert)))

    async def certificates(self) -> list[IssuedCertificate]:
        out = []
        for _key, raw in await (await self._bucket("certs")).items():
            try:
                out.append(IssuedCertificate(**_fields(IssuedCertificate, self._open(raw))))
            except (MeshError, TypeError):
                continue
        return out

    @staticmethod
    def token_key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    async def put_token(self, token: str, grant: JoinToken) -> None:
        await (await self._bucket("tokens")).create(
            self.token_key(token), sign_document(self.root, asdict(grant))
        )

    async def _token(self, token: str) -> tuple[JoinToken, int]:
        kv = await self._bucket("tokens")
        found = await kv.entry(self.token_key(token))
        if found is None:
            raise Unauthenticated("unknown join token")
        try:
            grant = JoinToken(**_fields(JoinToken, self._open(found[0])))
        except (MeshError, TypeError):
            raise Unauthenticated("join token record is not signed by the trust root") from None
        if grant.used_at is not None:
            raise Unauthenticated("join token was already used")
        if grant.expires_at < time.time():
            raise Unauthenticated("join token has expired")
        return grant, found[1]

    async def peek_token(self, token: str) -> JoinToken:
        """The grant of a usable token, without using it.

        Raises:
            Unauthenticated: unknown, forged, expired or already used token.
        """
        return (await self._token(token))[0]

    async def redeem_token(self, token: str, serial: str) -> JoinToken:
        """Mark a token used (compare-and-set, so it works once across registries).

        Raises:
            Unauthenticated: unknown, forged, expired or already used token.
        """
        kv = await self._bucket("tokens")
        key = self.token_key(token)
        grant, revision = await self._token(token)
        found = (b"", revision)
        used = JoinToken(**{**asdict(grant), "used_at": time.time(), "used_by_serial": serial})
        try:
            await kv.update(key, sign_document(self.root, asdict(used)), found[1])
        except FailedPrecondition:
            raise Unauthenticated("join token was already used") from None
        return grant

    async def revoke(self, revocation: Revocation) -> None:
        await (await self._bucket("revoked")).put(
            revocation.serial, sign_document(self.root, asdict(revocation))
        )

    async def revocations(self) -> list[Revocation]:
        out = []
        for _key, raw in await (await self._bucket("revoked")).items():
            try:
                out.append(Revocation(**_fields(Revocation, self._open(raw))))
            except (MeshError, TypeError):
                continue
        return out

    async def watch_revocations(self) -> AsyncIterator[Revocation | None]:
        """Verified revocations as they appear (``None`` once the existing ones were given);
        forged entries are skipped."""
        async for item in (await self._bucket("revoked")).watch():
            if item is None:
                yield None
                continue
            _key, raw = item
            if raw is None:
                continue
            try:
                yield Revocation(**_fields(Revocation, self._open(raw)))
            except (MeshError, TypeError):
                continue

    # --- audit -------------------------------------------------------------------------------

    async def audit_stream(self) -> Stream:
        if self._audit is None:
            self._audit = await self.transport.stream(
                audit_stream(self.prefix), audit_subject(self.prefix), replicas=self.replicas
            )
        return self._audit

    async def append_audit(self, record: AuditRecord) -> int:
        """Append a record linked to the current last one (retrying when another registry
        appended first). Returns its sequence."""
        stream = await self.audit_stream()
        for _ in range(20):
            last = await stream.last()
            prev = hashlib.sha256(last[1]).hexdigest() if last else ""
            body = asdict(record)
            body.pop("seq")
            body["prev"] = prev
            try:
                return await stream.append(
                    sign_document(self.root, body), expect_last=last[0] if last else 0
                )
            except FailedPrecondition:
                continue
        raise FailedPrecondition("audit log is too contended to append")

    async def read_audit(self) -> tuple[list[AuditRecord], list[str]]:
        """Every audit record, verified; and the problems found in the chain."""
        stream = await self.audit_stream()
        last = await stream.last()
        return verify_audit_chain(
            await stream.read(), self.root.public_key, last_seq=last[0] if last else None
        )
