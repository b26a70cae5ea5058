"""The policy registry: the mesh's control plane, written only against the public SDK (``mesh``
and ``mesh.control_plane``).

It holds the trust root's key (pass ``--root-key`` to ``mesh-agent run``) and keeps all of its
state in JetStream through ``mesh.control_plane.ControlStore``: policy revisions, issued
certificates, join tokens (hashed), revocations and the hash-chained audit log. Restarting it
loses nothing, and several instances can run at once (writes are compare-and-set).

Run it::

    mesh-agent run mesh_agents.registry:registry --identity keys/registry --root-key keys

Every endpoint but ``renew`` requires the caller to hold the ``admin`` role. A certificate
that expired while no registry answered is renewed on the grace path (``serve_grace_renewal``:
proof of the old key, within ``Timeouts.renewal_grace``, audited).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any
from weakref import WeakKeyDictionary

from mesh import (
    Agent,
    Certificate,
    Context,
    FailedPrecondition,
    MeshError,
    MeshHandle,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    parse_policy,
)
from mesh.control_plane import (
    ADMIN_ROLE,
    DEFAULT_CERT_TTL,
    DENIAL_TOPIC,
    REGISTRY,
    SIGNALS_TOPIC,
    ApplyReply,
    ApplyRequest,
    AuditRecord,
    CertificateReply,
    DenialReport,
    EdgeReport,
    Empty,
    EnrolmentRequest,
    GraceRenewal,
    HeadKeeper,
    HistoryReply,
    IdentityInfo,
    IdentityList,
    IssuedCertificate,
    JoinToken,
    PolicyRevision,
    RenewRequest,
    RevisionInfo,
    Revocation,
    RevokeReply,
    RevokeRequest,
    RollbackRequest,
    SavedState,
    SignalsReply,
    SignalsRequest,
    SignalTable,
    TokenReply,
    TokenRequest,
    canonical_policy_bytes,
    diff_policies,
    parse_canonical,
    serve_enrolment,
    serve_grace_renewal,
    verify_audit_chain,
)

SERIAL = re.compile(r"[0-9a-f]{32}")
MAX_CERT_TTL = 30 * 24 * 3600.0
ROOT_WARNING_S = 90 * 24 * 3600
# Under the "mesh" logger: silent unless the process configures logging (mesh-agent does).
log = logging.getLogger("mesh.registry")

registry = Agent(
    REGISTRY,
    version="0.1.0",
    description="Policy registry: identities, policy revisions, audit log.",
)


def _require_admin(ctx: Context) -> None:
    if ADMIN_ROLE not in ctx.caller.roles:
        raise PermissionDenied(
            f"{ctx.caller.agent} lacks the admin role the registry requires for {ctx.endpoint}",
            rule="registry: admin role required",
        )


def _require_root(mesh: MeshHandle) -> None:
    if not mesh.trust_root.can_sign:
        raise FailedPrecondition("this registry was started without the trust root key")


def _actor(ctx: Context) -> str:
    return f"{ctx.caller.agent}/{ctx.caller.instance}"


async def _audit(mesh: MeshHandle, kind: str, actor: str, subject: str, **details: Any) -> None:
    await mesh.control.append_audit(
        AuditRecord(kind=kind, actor=actor, subject=subject, details=details)
    )


async def _install(
    ctx: Context, policy_json: bytes, source: str, rollback_of: int | None = None
) -> ApplyReply:
    """Sign and store ``policy_json`` as the next revision (compare-and-set), then a head
    naming it. The revision number comes from everything this mesh signed that is known here
    (head, saved state, history), so it is never reused; ``current`` holding garbage or an
    older revision does not stop an apply."""
    mesh = ctx.mesh
    _require_root(mesh)
    keeper = _keeper(mesh)
    new = parse_canonical(policy_json, source=source)
    running = keeper.policy  # the revision the newest head names
    old = parse_canonical(running.policy_json, source=running.source) if running else None
    if running is not None and running.policy_json == policy_json and rollback_of is None:
        return ApplyReply(revision=running.revision, changes=[], unchanged=True)
    for _ in range(5):
        stored, expect = await mesh.control.policy_entry()
        rev = PolicyRevision(
            revision=keeper.next_revision(stored),
            policy_json=policy_json,
            source=source,
            applied_by=_actor(ctx),
            applied_at=time.time(),
            rollback_of=rollback_of,
        )
        try:
            raw = await mesh.control.write_policy(rev, expect)
            break
        except FailedPrecondition:
            # `current` changed under us: another registry applied (then stop), or someone
            # rewrote it with garbage or an older revision (then write over it).
            now, _ = await mesh.control.policy_entry()
            if now is not None and now.revision >= rev.revision:
                raise FailedPrecondition(
                    "another revision was applied at the same time; look at `mesh-policy get` "
                    "and retry"
                ) from None
    else:
        raise FailedPrecondition("the policy store is too contended to apply; retry")
    revision = rev.revision
    await keeper.policy_applied(rev, raw)
    changes = diff_policies(old, new)
    await _audit(
        mesh,
        "policy.rollback" if rollback_of else "policy.applied",
        _actor(ctx),
        f"revision {revision}",
        source=source,
        sha256=rev.sha256,
        rollback_of=rollback_of,
        changes=changes,
    )
    return ApplyReply(revision=revision, changes=changes)


@registry.endpoint(name="apply")
async def apply(req: ApplyRequest, ctx: Context) -> ApplyReply:
    """Validate, sign and distribute a policy as the next revision."""
    _require_admin(ctx)
    policy = parse_policy(req.policy, source=req.source, require_units=True)
    return await _install(ctx, canonical_policy_bytes(policy), req.source)


@registry.endpoint(name="get", idempotent=True)
async def get(_: Empty, ctx: Context) -> RevisionInfo:
    """The current revision."""
    _require_admin(ctx)
    current = _keeper(ctx.mesh).policy  # what the head names, whatever `current` holds
    if current is None:
        raise NotFound("no policy has been applied yet")
    return RevisionInfo.of(current)


@registry.endpoint(name="history", idempotent=True)
async def history(_: Empty, ctx: Context) -> HistoryReply:
    """Every kept revision, oldest first."""
    _require_admin(ctx)
    revisions = await ctx.mesh.control.policy_history()
    return HistoryReply(revisions=[RevisionInfo.of(r) for r in revisions])


@registry.endpoint(name="rollback")
async def rollback(req: RollbackRequest, ctx: Context) -> ApplyReply:
    """Apply an earlier revision again, as a new revision."""
    _require_admin(ctx)
    for rev in await ctx.mesh.control.policy_history():
        if rev.revision == req.revision:
            return await _install(ctx, rev.policy_json, rev.source, rollback_of=rev.revision)
    raise NotFound(f"revision {req.revision} is not in the kept history")


@registry.endpoint(name="token")
async def token(req: TokenRequest, ctx: Context) -> TokenReply:
    """Make a one-time join token for an agent; only its hash is stored."""
    _require_admin(ctx)
    _require_root(ctx.mesh)
    secret = "mjt_" + secrets.token_urlsafe(32)
    expires = time.time() + req.ttl
    grant = JoinToken(
        agent=req.agent,
        roles=sorted(set(req.roles)),
        expires_at=expires,
        cert_ttl=req.cert_ttl,
        created_by=_actor(ctx),
    )
    await ctx.mesh.control.put_token(secret, grant)
    await _audit(
        ctx.mesh,
        "identity.token_created",
        _actor(ctx),
        req.agent,
        roles=grant.roles,
        expires_at=expires,
    )
    return TokenReply(token=secret, expires_at=expires)


@registry.endpoint(name="identities", idempotent=True)
async def identities(_: Empty, ctx: Context) -> IdentityList:
    """Every certificate the registry issued, with its revocation state."""
    _require_admin(ctx)
    revoked = {r.serial for r in await ctx.mesh.control.revocations()}
    head = _keeper(ctx.mesh).head
    if head is not None:
        revoked |= head.revoked_serials  # also those whose records someone deleted
    return IdentityList(
        root_key_id=ctx.mesh.trust_root.key_id,
        root_not_after=ctx.mesh.trust_root.not_after,
        identities=[
            IdentityInfo.of(c, revoked=c.serial in revoked)
            for c in sorted(await ctx.mesh.control.certificates(), key=lambda c: c.issued_at)
        ],
    )


@registry.endpoint(name="revoke")
async def revoke(req: RevokeRequest, ctx: Context) -> RevokeReply:
    """Revoke a serial, or every current certificate of an agent; agents refuse them within
    seconds."""
    _require_admin(ctx)
    _require_root(ctx.mesh)
    now = time.time()
    # A certificate stays renewable for the grace after its expiry (protocol section 29):
    # revoke those too, and keep them listed in heads until the grace is over.
    grace = ctx.mesh.config.timeouts.renewal_grace
    certs = [
        c
        for c in await ctx.mesh.control.certificates()
        if (c.serial == req.target or c.agent == req.target) and c.not_after + grace > now
    ]
    if not certs and SERIAL.fullmatch(req.target):
        # A serial the registry did not issue (offline issuance): revoke it all the same,
        # for as long as any certificate can live.
        certs = [
            IssuedCertificate(
                serial=req.target,
                agent="(offline)",
                instance="",
                roles=[],
                not_after=int(now + MAX_CERT_TTL),
                issued_at=0.0,
                via="offline",
            )
        ]
    if not certs:
        raise NotFound(f"no current certificate with serial or agent {req.target!r}")
    for c in certs:
        revocation = Revocation(
            serial=c.serial,
            agent=c.agent,
            revoked_at=now,
            revoked_by=_actor(ctx),
            not_after=int(c.not_after + grace),
        )
        raw = await ctx.mesh.control.revoke(revocation)
        await _keeper(ctx.mesh).revoked(revocation, raw)
        await _audit(ctx.mesh, "identity.revoked", _actor(ctx), c.agent, serial=c.serial)
    return RevokeReply(revoked=[c.serial for c in certs])


# Renewals per identity (agent, instance): an agent renews at half its certificate's life
# (12 h for the default 24 h), so three at once and then one a minute leaves room for retries
# and restarts while a certified insider cannot flood the certificate store and audit log.
RENEW_BURST = 3
RENEW_INTERVAL_S = 60.0
MAX_RENEW_BUCKETS = 10_000


class RenewalLimiter:
    """Token buckets per identity for ``renew``: ``burst`` tokens, one more every ``interval``
    seconds. At most ``max_buckets`` are kept (the least recently used is dropped first, and
    comes back full).

    Args:
        burst: renewals allowed at once.
        interval: seconds per renewal after that.
        max_buckets: the most identities tracked.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        burst: int = RENEW_BURST,
        interval: float = RENEW_INTERVAL_S,
        max_buckets: int = MAX_RENEW_BUCKETS,
        clock: Any = time.monotonic,
    ) -> None:
        self.burst, self.interval, self.max_buckets = burst, interval, max_buckets
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # tokens, when

    def take(self, key: tuple[str, str]) -> float | None:
        """Take a renewal for ``key``: ``None`` when allowed, else the seconds to wait."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) / self.interval)
        wait = None if tokens >= 1.0 else (1.0 - tokens) * self.interval
        self._buckets[key] = (tokens - 1.0 if wait is None else tokens, now)  # most recent last
        while len(self._buckets) > self.max_buckets:
            del self._buckets[next(iter(self._buckets))]
        return wait


_renewals: WeakKeyDictionary[MeshHandle, RenewalLimiter] = WeakKeyDictionary()


def _renewal_limiter(mesh: MeshHandle) -> RenewalLimiter:
    limiter = _renewals.get(mesh)
    if limiter is None:
        limiter = _renewals[mesh] = RenewalLimiter()
    return limiter


async def _redeliver(mesh: MeshHandle, raw: bytes, grant: JoinToken) -> None:
    """Make sure a certificate delivered again is in the certificate store: an idempotent put
    (the first delivery may have failed between redeeming the token and recording it)."""
    await _store_certificate(mesh, raw, "token", grant.used_at or time.time())


async def _store_certificate(
    mesh: MeshHandle, raw: bytes, via: str, issued_at: float
) -> Certificate:
    cert = mesh.verifier.verify(raw)
    await mesh.control.record_certificate(
        IssuedCertificate(
            serial=cert.serial,
            agent=cert.agent,
            instance=cert.instance,
            roles=list(cert.roles),
            not_after=cert.not_after,
            issued_at=issued_at,
            via=via,
            certificate=raw,
        )
    )
    return cert


@registry.endpoint(name="renew")
async def renew(_: RenewRequest, ctx: Context) -> CertificateReply:
    """A fresh certificate for the caller's own keys, instance and roles (any agent), at most
    ``RENEW_BURST`` at once and one per ``RENEW_INTERVAL_S`` after that per identity."""
    mesh = ctx.mesh
    _require_root(mesh)
    old = ctx.caller.certificate
    if old is None:
        raise Unauthenticated("no certificate to renew")
    wait = _renewal_limiter(mesh).take((old.agent, old.instance))
    if wait is not None:
        raise ResourceExhausted(
            f"{old.agent}/{old.instance} renews too often (at most {RENEW_BURST} at once, "
            f"then one every {RENEW_INTERVAL_S:g} s)",
            retry_after=round(wait, 3),
        )
    life = min(float(old.not_after - old.not_before - 60), DEFAULT_CERT_TTL)
    cert = mesh.trust_root.reissue(old, ttl=life)
    await _record_issue(mesh, cert.raw, "renewal", _actor(ctx), previous=old.serial)
    return CertificateReply.of(cert)


async def _grace_renew(mesh: MeshHandle, req: GraceRenewal) -> bytes:
    """Renew a certificate presented on the grace path (``serve_grace_renewal`` checked the
    proof of its key, the nonce, the time and the grace): the same limit as ``renew``, then
    refuse a revoked identity, issue, record and audit how long past its expiry it was."""
    _require_root(mesh)
    old = req.certificate
    wait = _renewal_limiter(mesh).take((old.agent, old.instance))
    if wait is not None:
        raise ResourceExhausted(
            f"{old.agent}/{old.instance} renews too often (at most {RENEW_BURST} at once, "
            f"then one every {RENEW_INTERVAL_S:g} s)",
            retry_after=round(wait, 3),
        )
    # The head lists revocations (through the grace, see revoke); the store also names the
    # other serials of this instance: revoking any certificate of these keys revokes them all.
    revoked = {r.serial for r in await mesh.control.revocations()} | mesh.verifier.revoked
    same = {
        c.serial
        for c in await mesh.control.certificates()
        if (c.agent, c.instance) == (old.agent, old.instance)
    }
    if old.serial in revoked or same & revoked:
        raise Unauthenticated(
            f"{old.agent}/{old.instance} is revoked: it cannot be renewed; the agent needs a "
            f"new join token (mesh-policy identity token {old.agent})"
        )
    life = min(float(old.not_after - old.not_before - 60), DEFAULT_CERT_TTL)
    cert = mesh.trust_root.reissue(old, ttl=life)
    await _record_issue(
        mesh,
        cert.raw,
        "grace",
        f"{old.agent}/{old.instance}",
        previous=old.serial,
        expired_for_s=round(req.expired_for, 3),
        grace_s=req.grace,
    )
    log.warning(
        "registry.grace_renewal agent=%(agent)s instance=%(instance)s expired_for_s=%(expired)s",
        {"agent": old.agent, "instance": old.instance, "expired": round(req.expired_for)},
        extra={"event": "registry.grace_renewal"},
    )
    return cert.raw


async def _record_issue(mesh: MeshHandle, raw: bytes, via: str, actor: str, **details: Any) -> None:
    cert = await _store_certificate(mesh, raw, via, time.time())
    kind = "identity.renewed" if via in ("renewal", "grace") else "identity.issued"
    await _audit(
        mesh,
        kind,
        actor,
        cert.agent,
        serial=cert.serial,
        instance=cert.instance,
        roles=list(cert.roles),
        via=via,
        not_after=cert.not_after,
        **details,
    )


SIGNAL_WINDOW_S = 60.0
_signals: WeakKeyDictionary[MeshHandle, SignalTable] = WeakKeyDictionary()


def _table(mesh: MeshHandle) -> SignalTable:
    table = _signals.get(mesh)
    if table is None:
        table = _signals[mesh] = SignalTable(window=SIGNAL_WINDOW_S)
    return table


@registry.on_event("*", SIGNALS_TOPIC)
async def collect(report: EdgeReport, ctx: Context) -> None:
    """Keep agents' golden-signal reports for `mesh-policy top` and `graph` (in memory, for a
    minute: every registry instance receives every report)."""
    if (report.agent, report.instance) != (ctx.caller.agent, ctx.caller.instance):
        return  # an instance reports only for itself
    _table(ctx.mesh).add(report)


@registry.endpoint(name="signals", idempotent=True)
async def signals(req: SignalsRequest, ctx: Context) -> SignalsReply:
    """Golden signals per agent and endpoint over the last minute, and the call graph."""
    _require_admin(ctx)
    table = _table(ctx.mesh)
    await ctx.mesh.directory.watch_all(5)  # from the first such call on: every agent
    nodes = sorted({r.agent for r in ctx.mesh.directory.all()} | {a for a, _ in table.instances()})
    return SignalsReply(
        window_s=SIGNAL_WINDOW_S,
        rows=table.rows(req.reporter, by_caller=req.by_caller),
        edges=table.edges(req.reporter),
        nodes=nodes,
        traffic=table.traffic(),
    )


@registry.on_event("*", DENIAL_TOPIC)
async def denied(report: DenialReport, ctx: Context) -> None:
    """Write a callee's (signed) denial report into the audit log."""
    if report.agent != ctx.caller.agent:
        return  # an agent may only report denials of calls to itself
    await _audit(
        ctx.mesh,
        "authz.audit_only" if report.audit_only else "authz.denied",
        f"{ctx.caller.agent}/{ctx.caller.instance}",
        f"{report.caller} -> {report.agent}.{report.endpoint}",
        **{
            k: v
            for k, v in report.model_dump().items()
            if k not in ("agent", "endpoint") and (v is not None or k not in ("origin", "path"))
        },
    )


_keepers: WeakKeyDictionary[MeshHandle, HeadKeeper] = WeakKeyDictionary()


def _keeper(mesh: MeshHandle) -> HeadKeeper:
    keeper = _keepers.get(mesh)
    if keeper is None:
        raise FailedPrecondition("the registry is not started")
    return keeper


def _saved_state(mesh: MeshHandle) -> SavedState:
    return SavedState(mesh.config.state_dir, mesh.config.prefix)


async def _check_root(mesh: MeshHandle) -> None:
    """Refuse to run with a root key that is not this mesh's: it would sign audit records and
    certificates nobody can verify (``audit verify`` would fail for ever after).

    Raises:
        FailedPrecondition: the root key did not issue this registry's certificate, or the
            current policy or the audit log's last record in the store is not signed by it
            (the state of another mesh under the same prefix on this NATS).
    """
    root = mesh.trust_root
    issuer = mesh.identity.certificate.issuer
    if issuer != root.key_id:
        raise FailedPrecondition(
            f"the root key {root.key_id} is not the root of this registry's certificate "
            f"(issued by {issuer}): pass the mesh's root.key to --root-key"
        )
    fix = (
        f"another mesh's state under prefix {mesh.config.prefix!r}? start this registry with "
        "that mesh's root key, or use another --prefix"
    )
    saved = _saved_state(mesh).load("registry-head")
    if saved is not None:
        try:
            mesh.control.decode_head(saved)
        except MeshError as exc:
            raise FailedPrecondition(
                f"the head this registry saved does not verify with the root key "
                f"{root.key_id} ({exc.message}): {fix}"
            ) from None
        # This registry's own saved state is this mesh's: documents in the store signed by
        # another key were put there by someone else, and the head keeper repairs them.
        return
    try:
        await mesh.control.current_policy()
    except Unauthenticated as exc:
        raise FailedPrecondition(
            f"the current policy in the store does not verify with the root key {root.key_id} "
            f"({exc.message}): {fix}"
        ) from None
    last = await (await mesh.control.audit_stream()).last()
    if last is not None:
        _, problems = verify_audit_chain([last], root.public_key, first_seq=last[0])
        if problems:
            raise FailedPrecondition(
                f"the last audit record does not verify with the root key {root.key_id} "
                f"({problems[0]}): {fix}"
            )
    head = await mesh.control.head_raw()
    if head is not None:
        try:
            mesh.control.decode_head(head)
        except Unauthenticated as exc:
            raise FailedPrecondition(
                f"the head in the store does not verify with the root key {root.key_id} "
                f"({exc.message}): {fix}"
            ) from None


@registry.on_start
async def started(mesh: MeshHandle) -> None:
    """Check the root key, sign a head and keep signing, answer enrolments, and note the
    start in the audit log."""
    await _check_root(mesh)
    timeouts = mesh.config.timeouts
    keeper = HeadKeeper(
        mesh.control,
        refresh=timeouts.head_refresh,
        ttl=timeouts.head_ttl,
        state=_saved_state(mesh),
        actor=f"registry/{mesh.instance}",
    )
    await keeper.start()
    _keepers[mesh] = keeper

    async def issue(req: EnrolmentRequest) -> bytes:
        _require_root(mesh)
        try:
            grant = await mesh.control.peek_token(req.token, sign_pk=req.sign_pk, box_pk=req.box_pk)
            if grant.agent != req.agent:
                raise Unauthenticated(f"this join token is for another agent, not {req.agent!r}")
            again = grant.delivered_to(req.sign_pk, req.box_pk)
            if again is not None:
                # A retry by the keys the token was used for (its reply was lost): the same
                # certificate again; nothing new is issued or audited.
                await _redeliver(mesh, again, grant)
                return again
            cert = mesh.trust_root.issue(
                req.agent,
                sign_pk=req.sign_pk,
                box_pk=req.box_pk,
                roles=grant.roles,
                ttl=grant.cert_ttl,
            )
            delivered = await mesh.control.redeem_token(
                req.token,
                cert.serial,
                sign_pk=req.sign_pk,
                box_pk=req.box_pk,
                certificate=cert.raw,
            )
            if delivered != cert.raw:  # a concurrent attempt by the same keys redeemed it
                return delivered
        except MeshError as exc:
            await _audit(
                mesh, "identity.enrolment_refused", req.agent, req.agent, reason=exc.message
            )
            raise
        await _record_issue(mesh, cert.raw, "token", req.agent, token_created_by=grant.created_by)
        return cert.raw

    await serve_enrolment(mesh, issue)

    async def grace_renew(req: GraceRenewal) -> bytes:
        return await _grace_renew(mesh, req)

    await serve_grace_renewal(mesh, grace_renew)
    if mesh.trust_root.not_after is not None:
        left = mesh.trust_root.not_after - time.time()
        if left < ROOT_WARNING_S:
            fields = {"days_left": round(left / 86400, 1), "key_id": mesh.trust_root.key_id}
            log.warning(
                "registry.trust_root_expiring days_left=%(days_left)s key_id=%(key_id)s",
                fields,
                extra={"event": "registry.trust_root_expiring", **fields},
            )
    await _audit(
        mesh, "registry.started", f"registry/{mesh.instance}", "registry", version=registry.version
    )


@registry.on_stop
async def stopped(mesh: MeshHandle) -> None:
    """Stop signing heads (another registry instance, or this one restarted, goes on)."""
    keeper = _keepers.pop(mesh, None)
    if keeper is not None:
        await keeper.close()


# The gateway-key endpoints are defined on this agent in their own module.
from . import gateway_keys as _gateway_keys  # noqa: E402, F401
