"""The control plane's state in JetStream: documents the registry signs and every agent verifies.

=====================  ==========================  ===========================================
bucket / stream        key                         value (a signed document)
=====================  ==========================  ===========================================
``<p>-policy``         ``current`` (history 64)    ``PolicyRevision``
``<p>-certs``          certificate serial          ``IssuedCertificate``
``<p>-tokens``         SHA-256 of the join token   ``JoinToken`` (the token itself is never stored)
``<p>-revoked``        certificate serial          ``Revocation``
``<p>-head``           ``head``                    ``Head``: the current state, re-signed often
``<p>-gateway-keys``   a gateway key's id          ``GatewayKey`` (``mesh._runtime.gateway_keys``)
``<p>-audit`` stream   subject ``<p>.audit``       ``AuditRecord``, hash-chained
=====================  ==========================  ===========================================

A signed document is ``msgpack([body, signature])``: ``body`` is a msgpack map, ``signature``
the trust root's Ed25519 signature over it. The registry holds the root key (or, later, an
intermediate); agents hold only the public key, so nobody else can forge policy, revocations
or audit records, even with full access to NATS. Signatures do not say what is newest: the
head does (``mesh._core.head``), and ``recover`` re-creates a store someone deleted.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh._core import signed
from mesh._core.head import Head, audit_matches, decode_head, encode_head
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
HEAD_KEY = "head"
# (store, history) of every control-plane bucket, for ``recover``; ``gateway-keys`` holds the
# HTTP gateway's key entries (``mesh._runtime.gateway_keys``).
STORES = (
    ("policy", POLICY_HISTORY),
    ("certs", 1),
    ("tokens", 1),
    ("revoked", 1),
    ("head", 1),
    ("gateway-keys", 1),
)


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
    """A one-time join token's grant (stored under the token's SHA-256, never in clear).

    Once used, it also holds the keys it was used for and the certificate issued to them, so
    that a retry by the same keys (whose reply was lost) gets that certificate again.
    """

    agent: str
    roles: list[str]
    expires_at: float
    cert_ttl: float
    created_by: str
    used_at: float | None = None
    used_by_serial: str | None = None
    used_by_sign_pk: bytes | None = None
    used_by_box_pk: bytes | None = None
    certificate: bytes | None = None

    def delivered_to(self, sign_pk: bytes, box_pk: bytes) -> bytes | None:
        """The certificate this used token gave to these keys (``None``: not used by them)."""
        if self.used_at is None or not self.certificate:
            return None
        if (self.used_by_sign_pk, self.used_by_box_pk) != (sign_pk, box_pk):
            return None
        return self.certificate


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
        replicas: JetStream replicas when creating stores (``None``: 3 on a cluster).
    """

    def __init__(
        self, transport: Transport, prefix: str, root: TrustRoot, *, replicas: int | None = None
    ) -> None:
        self.transport = transport
        self.prefix = prefix
        self.root = root
        self.replicas = replicas
        self._kv: dict[str, KeyValueBucket] = {}
        self._ids: dict[str, str | None] = {}  # incarnation of each store opened
        self._audit: Stream | None = None
        self.on_audit_appended: Callable[[], None] | None = None

    async def _bucket(self, name: str, history: int = 1) -> KeyValueBucket:
        kv = self._kv.get(name)
        if kv is None:
            bucket = store_bucket(self.prefix, name)
            kv = await self.transport.key_value(bucket, replicas=self.replicas, history=history)
            self._ids[bucket] = await self.transport.bucket_id(bucket)
            self._kv[name] = kv
        return kv

    async def _write(self, name: str, op: Callable[[KeyValueBucket], Awaitable[int]]) -> int:
        """Run a write; when it fails because the store was deleted, re-create it and retry
        once (a compare-and-set conflict is not retried)."""
        history = dict(STORES)[name]
        try:
            return await op(await self._bucket(name, history))
        except FailedPrecondition:
            raise
        except MeshError:
            if not await self.recover():
                raise
        return await op(await self._bucket(name, history))

    async def recover(self) -> list[str]:
        """Re-create every store that was deleted (or replaced) since it was opened here.

        The broker is not trusted: anyone with JetStream rights can delete a store. Writers and
        watchers call this when a store seems gone; the documents are signed, so a re-created
        store is no more trusted than the old one, and the head says what it must hold.

        Returns:
            The names of the stores re-created (or found replaced).

        Raises:
            Unavailable: JetStream could not be reached.
        """
        changed = []
        for name, history in STORES:
            bucket = store_bucket(self.prefix, name)
            if name not in self._kv:
                continue
            found = await self.transport.bucket_id(bucket)
            if found is not None and found == self._ids.get(bucket):
                continue
            self.transport.forget_bucket(bucket)
            del self._kv[name]
            await self._bucket(name, history)
            changed.append(bucket)
        if self._audit is not None:
            name = audit_stream(self.prefix)
            found = await self.transport.stream_id(name)
            if found is None or found != self._ids.get(name):
                self._audit = None
                await self.audit_stream()
                changed.append(name)
        return changed

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

    async def policy_entry(self) -> tuple[PolicyRevision | None, int | None]:
        """The current revision if it verifies, and the KV revision of ``current`` whatever it
        holds (so a writer can replace garbage by compare-and-set)."""
        found = await (await self.policy_bucket()).entry(POLICY_KEY)
        if found is None:
            return None, None
        try:
            return self.decode_policy(found[0]), found[1]
        except MeshError:
            return None, found[1]

    async def policy_named(self, revision: int, sha256: str) -> tuple[PolicyRevision, bytes] | None:
        """The kept revision with this number whose canonical JSON has this SHA-256 (as a head
        names it: a rollback re-applies the same JSON under a new number), with its bytes."""
        for raw, _rev in reversed(await (await self.policy_bucket()).history(POLICY_KEY)):
            if raw is None:
                continue
            try:
                rev = self.decode_policy(raw)
            except MeshError:
                continue
            if rev.revision == revision and rev.sha256 == sha256:
                return rev, raw
        return None

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

    async def write_policy(self, rev: PolicyRevision, expect: int | None) -> bytes:
        """Sign and store a new current revision; ``expect`` is the KV revision read before
        (CAS). Returns the signed bytes.

        Raises:
            FailedPrecondition: another registry applied a revision in between.
        """
        raw = sign_document(self.root, asdict(rev))
        await self.put_policy_raw(raw, expect)
        return raw

    async def put_policy_raw(self, raw: bytes, expect: int | None) -> None:
        """Store a signed revision as ``current`` (CAS as ``write_policy``): also how a writer
        puts back the revision the head names when the store lost or replaced it."""

        async def put(kv: KeyValueBucket) -> int:
            if expect is None:
                return await kv.create(POLICY_KEY, raw)
            return await kv.update(POLICY_KEY, raw, expect)

        await self._write("policy", put)

    async def watch_policy(self) -> AsyncIterator[bytes | None]:
        """Raw policy documents as they change (``None`` once the current one was delivered)."""
        async for item in (await self.policy_bucket()).watch():
            if item is None:
                yield None
            elif item[0] == POLICY_KEY and item[1] is not None:
                yield item[1]

    # --- certificates, tokens, revocations ---------------------------------------------------

    async def record_certificate(self, cert: IssuedCertificate) -> None:
        raw = sign_document(self.root, asdict(cert))
        await self._write("certs", lambda kv: kv.put(cert.serial, raw))

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

    async def token_keys(self) -> set[str]:
        """The keys of every token record (SHA-256 hex of each token), unverified: an index
        that says which tokens are worth looking up, not whether they are valid."""
        return {key for key, _raw in await (await self._bucket("tokens")).items()}

    async def _token(self, token: str) -> tuple[JoinToken, int]:
        kv = await self._bucket("tokens")
        found = await kv.entry(self.token_key(token))
        if found is None:
            raise Unauthenticated("unknown join token")
        try:
            grant = JoinToken(**_fields(JoinToken, self._open(found[0])))
        except (MeshError, TypeError):
            raise Unauthenticated("join token record is not signed by the trust root") from None
        return grant, found[1]

    @staticmethod
    def _usable(grant: JoinToken, sign_pk: bytes | None, box_pk: bytes | None) -> None:
        if grant.used_at is not None:
            if sign_pk is not None and box_pk is not None and grant.delivered_to(sign_pk, box_pk):
                return  # the same keys again: their certificate is delivered again
            raise Unauthenticated("join token was already used")
        if grant.expires_at < time.time():
            raise Unauthenticated("join token has expired")

    async def peek_token(
        self, token: str, *, sign_pk: bytes | None = None, box_pk: bytes | None = None
    ) -> JoinToken:
        """The grant of a usable token, without using it; with ``sign_pk`` and ``box_pk``, also
        the grant of a token already used by exactly these keys (``certificate`` is then set).

        Raises:
            Unauthenticated: unknown, forged, expired or already used (by other keys) token.
        """
        grant = (await self._token(token))[0]
        self._usable(grant, sign_pk, box_pk)
        return grant

    async def redeem_token(
        self, token: str, serial: str, *, sign_pk: bytes, box_pk: bytes, certificate: bytes
    ) -> bytes:
        """Mark a token used by these keys for this certificate (compare-and-set, so it works
        once across registries).

        Returns:
            The certificate to deliver: ``certificate``, or the one an earlier request by the
            same keys redeemed the token for (a retry whose first reply was lost).

        Raises:
            Unauthenticated: unknown, forged, expired or already used (by other keys) token.
        """
        kv = await self._bucket("tokens")
        key = self.token_key(token)
        for _ in range(2):  # a lost compare-and-set is read once more: by these keys?
            grant, revision = await self._token(token)
            self._usable(grant, sign_pk, box_pk)
            earlier = grant.delivered_to(sign_pk, box_pk)
            if earlier is not None:
                return earlier
            used = JoinToken(
                **{
                    **asdict(grant),
                    "used_at": time.time(),
                    "used_by_serial": serial,
                    "used_by_sign_pk": sign_pk,
                    "used_by_box_pk": box_pk,
                    "certificate": certificate,
                }
            )
            try:
                await kv.update(key, sign_document(self.root, asdict(used)), revision)
            except FailedPrecondition:
                continue
            return certificate
        raise Unauthenticated("join token was already used")

    async def revoke(self, revocation: Revocation) -> bytes:
        """Store a signed revocation; returns its bytes."""
        raw = sign_document(self.root, asdict(revocation))
        await self.put_revocation_raw(revocation.serial, raw)
        return raw

    async def put_revocation_raw(self, serial: str, raw: bytes) -> None:
        await self._write("revoked", lambda kv: kv.put(serial, raw))

    async def revocation_entries(self) -> dict[str, tuple[Revocation, bytes]]:
        """Verified revocations by serial, with their signed bytes (forged entries skipped)."""
        out = {}
        for _key, raw in await (await self._bucket("revoked")).items():
            try:
                r = Revocation(**_fields(Revocation, self._open(raw)))
            except (MeshError, TypeError):
                continue
            out[r.serial] = (r, raw)
        return out

    async def revocations(self) -> list[Revocation]:
        out = []
        for _key, raw in await (await self._bucket("revoked")).items():
            try:
                out.append(Revocation(**_fields(Revocation, self._open(raw))))
            except (MeshError, TypeError):
                continue
        return out

    # --- head ------------------------------------------------------------------------------

    async def head_bucket(self) -> KeyValueBucket:
        return await self._bucket("head")

    def decode_head(self, raw: bytes) -> Head:
        """Verify and parse a head of this mesh.

        Raises:
            DecodeError / Unauthenticated: malformed, not signed by the root, another prefix.
        """
        return decode_head(raw, self.root.public_key, self.prefix)

    async def head_raw(self) -> bytes | None:
        """The stored head's bytes, unverified (``None`` when there is none)."""
        return await (await self.head_bucket()).get(HEAD_KEY)

    async def head_entry(self) -> tuple[Head | None, int | None]:
        """The stored head if it verifies, and its KV revision whatever it holds."""
        found = await (await self.head_bucket()).entry(HEAD_KEY)
        if found is None:
            return None, None
        try:
            return self.decode_head(found[0]), found[1]
        except MeshError:
            return None, found[1]

    async def write_head(self, head: Head, expect: int | None) -> bytes:
        """Sign and store ``head`` (compare-and-set on ``expect``); returns its bytes.

        Raises:
            FailedPrecondition: another writer stored a head in between.
        """
        raw = encode_head(head, self.root.sign)

        async def put(kv: KeyValueBucket) -> int:
            if expect is None:
                return await kv.create(HEAD_KEY, raw)
            return await kv.update(HEAD_KEY, raw, expect)

        await self._write("head", put)
        return raw

    async def watch_head(self) -> AsyncIterator[bytes | None]:
        """Raw heads as they change (``None`` once the current one was delivered)."""
        async for item in (await self.head_bucket()).watch():
            if item is None:
                yield None
            elif item[0] == HEAD_KEY and item[1] is not None:
                yield item[1]

    # --- audit -------------------------------------------------------------------------------

    async def audit_stream(self) -> Stream:
        if self._audit is None:
            name = audit_stream(self.prefix)
            self._audit = await self.transport.stream(
                name, audit_subject(self.prefix), replicas=self.replicas
            )
            self._ids[name] = await self.transport.stream_id(name)
        return self._audit

    async def append_audit(self, record: AuditRecord) -> int:
        """Append a record linked to the current last one (retrying when another registry
        appended first; re-creating the stream once if it was deleted). Returns its sequence."""
        try:
            return await self._append_audit(record)
        except FailedPrecondition:
            raise
        except MeshError:
            if not await self.recover():
                raise
        return await self._append_audit(record)

    async def _append_audit(self, record: AuditRecord) -> int:
        stream = await self.audit_stream()
        for _ in range(20):
            last = await stream.last()
            prev = hashlib.sha256(last[1]).hexdigest() if last else ""
            body = asdict(record)
            body.pop("seq")
            body["prev"] = prev
            try:
                seq = await stream.append(
                    sign_document(self.root, body), expect_last=last[0] if last else 0
                )
            except FailedPrecondition:
                continue
            if self.on_audit_appended is not None:
                self.on_audit_appended()
            return seq
        raise FailedPrecondition("audit log is too contended to append")

    async def read_audit(self, head: Head | None = None) -> tuple[list[AuditRecord], list[str]]:
        """Every audit record, verified; and the problems found in the chain, including a
        chain shorter than the signed head counts (a truncated or replaced log) and the losses
        the registry recorded.

        Args:
            head: the newest head the reader accepted (else the stored one, if it verifies).
        """
        try:
            last, entries = await self._read_stream()
        except FailedPrecondition:
            raise
        except MeshError:
            if not await self.recover():  # the stream was deleted: re-created empty
                raise
            last, entries = await self._read_stream()
        records, problems = verify_audit_chain(
            entries, self.root.public_key, last_seq=last[0] if last else None
        )
        if head is None:
            head = (await self.head_entry())[0]
        if head is not None:
            problems.extend(audit_against_head(head, entries))
        for rec in records:
            if rec.kind == AUDIT_LOST:
                problems.append(
                    f"record {rec.seq}: the registry found the log cut short at "
                    f"{rec.details.get('found_length')} records where head "
                    f"v{rec.details.get('head_version')} counted "
                    f"{rec.details.get('expected_length')} (records were deleted)"
                )
        return records, problems

    async def _read_stream(self) -> tuple[tuple[int, bytes] | None, list[tuple[int, bytes]]]:
        stream = await self.audit_stream()
        return await stream.last(), await stream.read()


AUDIT_LOST = "audit.records_lost"


def audit_against_head(head: Head, entries: list[tuple[int, bytes]]) -> list[str]:
    """Problems of an audit chain (``(sequence, bytes)`` in order) measured against a head."""
    if head.audit_length == 0:
        return []
    have = entries[-1][0] if entries else 0
    if have < head.audit_length:
        return [
            f"the signed head v{head.version} counts {head.audit_length} records but the log "
            f"holds {have}: records {have + 1}..{head.audit_length} were deleted (truncated)"
        ]
    at = next((raw for seq, raw in entries if seq == head.audit_length), None)
    if not audit_matches(head, at):
        return [
            f"record {head.audit_length} is not the one the signed head v{head.version} counts "
            "(the log was replaced)"
        ]
    return []
