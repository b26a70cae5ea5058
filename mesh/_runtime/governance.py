"""Governance inside each agent process: the policy it runs, the revocations it honours, the
renewal of its certificate, rate limits, and reports of denials to the registry.

Freshness: the policy run is the one the newest signed head names (``mesh._core.head``), found
by hash in the policy store's history (or the agent's saved state); revocations come from the
head too. A head older than one already seen is refused, an expired one makes the agent stale.
Fail static: the last policy that verified stays in force while the registry or JetStream is
away; the watches are re-created after a reconnect or when the head goes quiet, and catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

from mesh._core.delegation import Delegation
from mesh._core.head import Head, check_successor
from mesh._core.identity import Certificate
from mesh._core.policy import PolicyEngine, Route, parse_canonical
from mesh._core.ratelimit import RateLimiter, TokenBucket
from mesh._log import get_logger
from mesh._runtime.agent import Peer
from mesh._runtime.concurrency import cancel_and_wait
from mesh._runtime.control import ControlStore, PolicyRevision
from mesh._runtime.freshness import SavedState
from mesh._runtime.ports import MeshHandle
from mesh._runtime.recovery import renew_in_grace
from mesh._runtime.registry_api import (
    DENIAL_TOPIC,
    REGISTRY,
    CertificateReply,
    DenialReport,
    RenewRequest,
)
from mesh.errors import (
    FailedPrecondition,
    MeshError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = ["Governance", "renewal_retry_in"]

log = get_logger(__name__)

RENEW_BACKOFF_CAP = 60.0  # seconds between renewal attempts, at most


def renewal_retry_in(delay: float, left: float, error: MeshError) -> float:
    """Seconds until the next renewal attempt after a failure.

    Before expiry: ``min(delay, max(1, left / 10))``, so a short certificate still gets
    several attempts; after it (``left <= 0``): ``delay`` with ±20 % jitter (a fleet that
    expired together does not come back at once). Never earlier than the registry's
    ``retry_after``.

    Args:
        delay: the current backoff (1 s doubling to 60 s).
        left: seconds until the certificate's ``not_after`` (negative: expired).
        error: why the attempt failed.
    """
    wait = min(delay, max(1.0, left / 10)) if left > 0 else delay * random.uniform(0.8, 1.2)
    if isinstance(error, ResourceExhausted) and error.retry_after:
        wait = max(wait, error.retry_after)  # the registry's per-identity limit
    return wait


class Governance:
    """One per ``Mesh``; the pipelines ask it for routes before sending and before serving.

    Args:
        mesh: the running mesh, through its narrow handle.
        policy_changed: called when a revision was applied or refused (to acknowledge it).
        replace_certificate: switches the mesh to a renewed certificate.
        own_revoked: called once when this instance's own certificate is revoked (the mesh
            drains; it must not wait for governance's tasks, which the drain cancels).
    """

    def __init__(
        self,
        mesh: MeshHandle,
        *,
        policy_changed: Callable[[], None],
        replace_certificate: Callable[[Certificate], Awaitable[None]],
        own_revoked: Callable[[], None] | None = None,
    ) -> None:
        self._mesh = mesh
        self._own_revoked = own_revoked
        self._policy_changed = policy_changed
        self._replace_certificate = replace_certificate
        self.engine = PolicyEngine(None)
        self.revision: int | None = None
        self.error: str | None = None
        self.head: Head | None = None
        self.document: PolicyRevision | None = None  # the revision in force, as signed
        self.stale: str | None = None  # why this agent may not run the current state
        self._saved = SavedState(mesh.config.state_dir, mesh.config.prefix)
        self._running: tuple[int, str] | None = None  # (revision, SHA-256) in force
        # Verified revisions by (revision, SHA-256): what a head names.
        self._known: dict[tuple[int, str], tuple[PolicyRevision, bytes]] = {}
        self._head_refused: str | None = None
        self._head_unsigned = False  # the head refused was not signed by this trust root
        self._head_quiet_since = 0.0
        self.limiter = RateLimiter()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self._reports = TokenBucket(20.0, 50)
        self._suppressed = 0
        self._store: ControlStore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._policy_loaded = asyncio.Event()
        self._head_loaded = asyncio.Event()
        self._resolved = asyncio.Event()  # the policy the head names is running
        self._policy_seen = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, store: ControlStore, timeout: float) -> None:
        """Load the newest head and the policy it names, then keep watching them.

        Raises:
            Unavailable: the stores could not be read within ``timeout``.
            FailedPrecondition: no usable head arrived within ``timeout`` (none at all, one
                not signed by this agent's trust root, or the policy it names could not be
                found); with ``allow_no_policy``, or for a process holding the root key, a
                mesh with no head yet starts with no policy.
        """
        self._store = store
        self._load_saved()
        self.restart_watches()
        if self.head is not None:  # the saved head: the floor, and maybe the policy to run
            self._apply_revocations(self.head)
            self._resolve()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            await asyncio.wait_for(
                asyncio.gather(self._policy_loaded.wait(), self._head_loaded.wait()), timeout
            )
        except TimeoutError:
            raise Unavailable("the control plane's head and policy did not load in time") from None
        can_sign = self._mesh.trust_root.can_sign  # the registry checks the store itself
        if self.head is None and self._head_unsigned and not can_sign:
            # Most likely a wrong --root: say so now rather than at the deadline (a forged
            # head costs a fresh agent its start until the registry re-signs; it restarts).
            await self.close()
            raise FailedPrecondition(self._why_not_ready())
        no_head_ok = self._mesh.config.allow_no_policy or can_sign
        if self.head is not None or not no_head_ok:
            try:
                await asyncio.wait_for(self._resolved.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                await self.close()
                raise FailedPrecondition(self._why_not_ready()) from None
        if self.head is None and not self._mesh.trust_root.can_sign:
            log.warning("mesh.no_policy_head", note="development mode: no policy until a head")
        self._tasks["renew"] = asyncio.create_task(self._renew_loop(), name="mesh-renew")
        self._tasks["quiet"] = asyncio.create_task(self._quiet_watch(), name="mesh-head-quiet")

    def _why_not_ready(self) -> str:
        root = self._mesh.trust_root.key_id
        if self.head is None and self._head_unsigned:
            return (
                f"this agent's trust root {root} is not the mesh's: the mesh's head is not "
                "signed by it; check --root / MESH_TRUST_ROOT (if the root is right, someone "
                "replaced the head: the registry re-signs it within its refresh interval)"
            )
        if self.head is None and self._head_refused is not None:
            return f"the mesh's head was refused: {self._head_refused}"
        if self.head is None:
            return (
                "no signed head in the control plane: start the registry "
                "(mesh-agent run mesh_agents.registry:registry), or, for a development mesh "
                "without one, set allow_no_policy (MESH_ALLOW_NO_POLICY=1)"
            )
        return self.stale or f"the policy named by {self.head.describe()} is not available"

    def restart_watches(self) -> None:
        """(Re-)create the head and policy watches, e.g. after a reconnect."""
        for name, run in (("policy", self._watch_policy), ("head", self._watch_head)):
            old = self._tasks.pop(name, None)
            if old is not None:
                old.cancel()
            self._tasks[name] = asyncio.create_task(run(), name=f"mesh-watch-{name}")

    async def close(self) -> None:
        await cancel_and_wait(self._tasks.values())
        self._tasks.clear()

    async def _watch(
        self,
        open_watch: Callable[[], AsyncIterator[bytes | None]],
        apply: Callable[[bytes], None],
        ready: asyncio.Event,
    ) -> None:
        while True:
            try:
                async for item in open_watch():
                    if item is None:
                        ready.set()
                    else:
                        apply(item)
            except asyncio.CancelledError:
                raise
            except MeshError as exc:
                log.warning("mesh.watch_failed", error=exc.message)
            await asyncio.sleep(0.5)

    async def _watch_policy(self) -> None:
        assert self._store is not None
        await self._watch(self._store.watch_policy, self._apply_policy, self._policy_loaded)

    async def _watch_head(self) -> None:
        assert self._store is not None
        await self._watch(self._store.watch_head, self._apply_head, self._head_loaded)

    async def _quiet_watch(self) -> None:
        """When the head is past half its life with no newer one, the watch may be on a store
        that was deleted and re-created: look, and watch again. Also mark the agent stale once
        its head expired."""
        while True:
            head = self.head
            life = (head.expires_at - head.issued_at) if head is not None else 80.0
            await asyncio.sleep(min(max(0.5, life / 8), 5.0 if head is not None else 10.0))
            head = self.head
            assert self._store is not None
            if head is None:
                # No head yet (development mode): the head store may have been deleted and
                # re-created under this watch; look again.
                with contextlib.suppress(MeshError):
                    if await self._store.recover():
                        self.restart_watches()
                continue
            now = time.time()
            if head.expired(now) and self.stale is None:
                self._set_stale(
                    f"the newest head (v{head.version}) expired "
                    f"{now - head.expires_at:.0f} s ago: the registry is away or the broker "
                    "withholds newer heads"
                )
            if now > head.issued_at + (head.expires_at - head.issued_at) / 2:
                with contextlib.suppress(MeshError):
                    await self._store.recover()
                self.restart_watches()

    # --- head and policy ---------------------------------------------------------------------

    def _load_saved(self) -> None:
        assert self._store is not None
        raw = self._saved.load("head")
        if raw is not None:
            try:
                self.head = self._store.decode_head(raw)
            except MeshError as exc:
                log.warning("mesh.saved_head_refused", error=exc.message)
        raw = self._saved.load("policy")
        if raw is not None:
            with contextlib.suppress(MeshError):
                rev = self._store.decode_policy(raw)
                self._known[(rev.revision, rev.sha256)] = (rev, raw)

    def _set_stale(self, why: str | None) -> None:
        if why != self.stale:
            self.stale = why
            if why is not None:
                log.warning("mesh.control_plane_stale", reason=why)
            self._policy_changed()

    def _apply_head(self, raw: bytes) -> None:
        assert self._store is not None
        try:
            head = self._store.decode_head(raw)
        except MeshError as exc:
            self._head_refused = exc.message
            self._head_unsigned = isinstance(exc, Unauthenticated)
            log.error("mesh.head_refused", error=exc.message)
            return
        why = check_successor(self.head, head, time.time())
        if why is not None:
            self._head_refused = why
            log.error("mesh.head_refused", error=why)
            if self.head is not None and head.version < self.head.version:
                self._set_stale(f"the store holds an older head than v{self.head.version}: {why}")
            return
        self._head_refused = None
        if head != self.head:
            self.head = head
            self._saved.save("head", raw)
        self._apply_revocations(head)
        self._set_stale(None if not head.expired(time.time()) else f"head v{head.version} expired")
        self._resolve()

    def _apply_policy(self, raw: bytes) -> None:
        assert self._store is not None
        try:
            rev = self._store.decode_policy(raw)
        except MeshError as exc:
            # Not a NACK: what runs is what the head names, and this is not it.
            log.warning("mesh.policy_document_refused", error=exc.message)
            return
        self._remember(rev, raw)
        self._resolve()

    def _remember(self, rev: PolicyRevision, raw: bytes) -> None:
        self._known[(rev.revision, rev.sha256)] = (rev, raw)
        if len(self._known) > 8:  # keep the newest few (a broker may replay old ones)
            del self._known[min(self._known)]

    def _resolve(self) -> None:
        """Run the policy the head names, once it is known; fetch it when it is not."""
        head = self.head
        if head is None:
            return
        if head.policy_sha256 is None:
            self._resolved.set()  # a signed "no policy yet"
            return
        if (head.policy_revision, head.policy_sha256) == self._running:
            self._resolved.set()
            return
        if (
            self.revision is not None
            and head.policy_revision is not None
            and head.policy_revision < self.revision
        ):
            return  # heads only grow; this cannot be newer than what runs
        named = (head.policy_revision or 0, head.policy_sha256)
        found = self._known.get(named)
        if found is None:
            if "fetch" not in self._tasks or self._tasks["fetch"].done():
                self._tasks["fetch"] = asyncio.create_task(
                    self._fetch(head), name="mesh-policy-fetch"
                )
            return
        rev, raw = found
        try:
            policy = parse_canonical(rev.policy_json, source=rev.source)
        except Exception as exc:
            # NACK: keep serving on the last good policy and say why in the directory.
            self.error = exc.message if isinstance(exc, MeshError) else type(exc).__name__
            log.error("mesh.policy_refused", error=self.error, revision=rev.revision)
        else:
            self.engine = PolicyEngine(policy, revision=rev.revision, source=rev.source)
            self.revision = rev.revision
            self.document = rev
            self._running = (rev.revision, rev.sha256)
            self.error = None
            self._saved.save("policy", raw)
            log.info("mesh.policy_applied", revision=rev.revision, source=rev.source)
            self._resolved.set()
            if not head.expired(time.time()):
                self.stale = None  # (the ACK below re-announces the record)
        self._policy_seen.set()
        self._policy_seen = asyncio.Event()
        self._policy_changed()

    async def _fetch(self, head: Head) -> None:
        """Find the revision ``head`` names in the policy store's history, retrying (the
        registry puts it back when the store lost it)."""
        assert self._store is not None and head.policy_sha256 is not None
        delay = 0.2
        named = (head.policy_revision or 0, head.policy_sha256)
        while self.head is head and named not in self._known:
            try:
                found = await self._store.policy_named(*named)
            except MeshError as exc:
                found = None
                log.warning("mesh.policy_fetch_failed", error=exc.message)
            if found is not None:
                self._remember(*found)
                break
            self._set_stale(
                f"{head.describe()} names policy revision {head.policy_revision}, which the "
                "policy store does not hold (the registry puts it back)"
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._resolve()

    async def wait_for_revision(self, revision: int, timeout: float = 10.0) -> None:
        """Wait until this agent runs ``revision`` (or a later one).

        Raises:
            Unavailable: it did not arrive within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.revision is None or self.revision < revision:
            left = end - loop.time()
            if left <= 0:
                raise Unavailable(f"policy revision {revision} did not arrive in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._policy_seen.wait(), left)

    def _apply_revocations(self, head: Head) -> None:
        revoked = self._mesh.verifier.revoked
        mine = self._mesh.identity.certificate.serial
        for serial in head.revoked_serials - revoked:
            revoked.add(serial)
            if serial == mine:
                log.error("mesh.own_certificate_revoked", serial=serial)
                if self._own_revoked is not None:
                    self._own_revoked()

    def outgoing(
        self,
        agent: str,
        endpoint: str,
        chain: tuple[str, tuple[str, ...], int, tuple[str, ...]] | None = None,
    ) -> Route:
        """The route of a call this instance makes; the caller's own check fails fast.
        ``chain``: what the callee will see of the call's delegation chain (origin, path,
        depth, scopes), so a rule on them decides here as it will there (``None``: direct).

        Raises:
            PermissionDenied: naming the rule.
        """
        me = self._mesh.identity.certificate
        route = self.engine.route(me.agent, me.roles, agent, endpoint, chain)
        decision = route.decision
        if not decision.allowed and chain is not None:
            # Refuse here only what the callee will refuse (the chain's view) and what a
            # direct call would be refused too: a denial that only the chain brings about is
            # left to the callee, which reports it to the audit log with the origin.
            decision = self.engine.route(me.agent, me.roles, agent, endpoint).decision
            if not decision.allowed:
                decision = route.decision
        if not decision.allowed and agent != REGISTRY and self._mesh.config.caller_checks:
            # The control plane is always reachable; it enforces its own rules.
            behalf = "" if chain is None else (
                f" for {chain[0]} via {' → '.join(chain[1])} (depth {chain[2]})"
            )  # fmt: skip
            raise PermissionDenied(
                f"{me.agent} may not call {agent}.{endpoint}{behalf}: "
                + decision.explain(self.engine.source, self.engine.revision),
                rule=decision.rule,
            )
        return route

    def incoming(self, caller: Peer, endpoint: str, delegation: Delegation | None = None) -> Route:
        """The route of a request this instance serves, decided before the handler runs:
        authorization (counted, denials reported) then the rate-limit take. ``delegation``:
        the request's verified chain, which rules may look at (``None``: a direct call).

        Raises:
            PermissionDenied: naming the rule that decided.
            ResourceExhausted: the rate limit is spent, with ``retry_after``.
        """
        name = self._mesh.name
        chain = None
        if delegation is not None:
            chain = (delegation.origin, delegation.path, delegation.depth, delegation.scopes)
        route = self.engine.route(caller.agent, caller.roles, name, endpoint, chain)
        me = self._mesh.identity.certificate
        if not (me.agent == REGISTRY and REGISTRY in me.roles):
            # (The registry checks roles itself: admin for everything but renew.)
            decision = route.decision
            if decision.allowed and not decision.audit_only:
                self.decisions[("allow", decision.rule)] += 1
            else:
                self.decisions[("deny" if not decision.allowed else "audit", decision.rule)] += 1
                self._report(caller, endpoint, decision.rule, decision.audit_only, delegation)
                if not decision.allowed:
                    behalf = "" if delegation is None else f" for {delegation.describe}"
                    raise PermissionDenied(
                        f"{caller.agent} may not call {name}.{endpoint}{behalf}: "
                        + decision.explain(self.engine.source, self.engine.revision),
                        rule=decision.rule,
                    )
        if route.rate_limit is not None:
            origin = caller.agent if delegation is None else delegation.origin
            wait = self.limiter.take(caller.agent, name, endpoint, route.rate_limit, origin)
            if wait is not None:
                who = caller.agent if origin == caller.agent else f"{caller.agent} for {origin}"
                raise ResourceExhausted(
                    f"rate limit of {name}.{endpoint} exceeded for {who}", retry_after=wait
                )
        return route

    def _report(
        self,
        caller: Peer,
        endpoint: str,
        rule: str,
        audit_only: bool,
        delegation: Delegation | None = None,
    ) -> None:
        if not self._reports.try_take():
            self._suppressed += 1  # bounded reporting: junk cannot flood the audit log
            return
        report = DenialReport(
            caller=caller.agent,
            caller_instance=caller.instance,
            caller_serial=caller.serial,
            agent=self._mesh.name,
            endpoint=endpoint,
            rule=rule,
            revision=self.engine.revision,
            audit_only=audit_only,
            suppressed=self._suppressed,
        )
        if delegation is not None:
            report.origin, report.path = delegation.origin, list(delegation.path)
        self._suppressed = 0
        self._mesh.spawn(self._publish_report(report))

    async def _publish_report(self, report: DenialReport) -> None:
        with contextlib.suppress(MeshError):
            await self._mesh.publish(DENIAL_TOPIC, report)

    # --- rate limits -------------------------------------------------------------------------

    def rate_peek(self, caller: str, endpoint: str) -> None:
        """Refuse before decrypting when a bucket is already empty (consumes nothing).

        Raises:
            ResourceExhausted: with ``retry_after``.
        """
        name = self._mesh.name
        settings = self.engine.endpoint_settings(name, endpoint)
        if settings is None or settings.rate_limit is None:
            return
        wait = self.limiter.check(caller, name, endpoint, settings.rate_limit)
        if wait is not None:
            raise ResourceExhausted(
                f"rate limit of {name}.{endpoint} exceeded for {caller}", retry_after=wait
            )

    # --- certificate renewal -----------------------------------------------------------------

    def renew_at(self, cert: Certificate) -> float:
        """Half the certificate's life, with ±10 % jitter so a fleet does not renew at once."""
        life = cert.not_after - cert.not_before
        return cert.not_before + life * (0.5 + random.uniform(-0.1, 0.1))

    async def _renew_loop(self) -> None:
        """Renew at half life; on failure retry with backoff, warning on every failure and,
        once the certificate has expired (the registry was away through the whole window),
        logging errors and renewing through the grace path until it recovers or is refused
        for good (past the grace, revoked: then only a new join token helps)."""
        mesh = self._mesh
        while True:
            cert = mesh.identity.certificate
            await asyncio.sleep(max(0.0, self.renew_at(cert) - time.time()))
            delay, expired = 1.0, False
            while mesh.identity.certificate is cert:
                try:
                    await self.renew_now()
                except MeshError as exc:
                    left = cert.not_after - time.time()
                    if left <= 0 and not expired:
                        delay, expired = 1.0, True  # the grace path: back off afresh
                    wait = renewal_retry_in(delay, left, exc)
                    if left > 0:
                        log.warning(
                            "mesh.renewal_failed",
                            error=exc.message,
                            expires_in_s=round(left),
                            retry_in_s=round(wait, 1),
                        )
                    else:
                        # Peers refuse this instance now (its directory record is dropped,
                        # its requests refused): say so at error level on every attempt.
                        log.error(
                            "mesh.certificate_expired",
                            serial=cert.serial,
                            expired_for_s=round(-left),
                            error=exc.message,
                            retry_in_s=round(wait, 1),
                        )
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, RENEW_BACKOFF_CAP)

    async def renew_now(self) -> Certificate:
        """Get a fresh certificate for this instance's keys (from the registry, or from the
        trust root when this process holds it) and switch to it without dropping traffic.

        Raises:
            MeshError: the registry refused or could not be reached.
        """
        mesh = self._mesh
        old = mesh.identity.certificate
        if mesh.trust_root.can_sign:
            new = mesh.trust_root.reissue(old)
        elif time.time() >= old.not_after:
            # Expired: ordinary requests are refused (unsealed, so they would only time out);
            # prove possession of the key to the registry instead.
            new = await renew_in_grace(mesh, mesh.config.timeouts.request)
            log.warning(
                "mesh.certificate_recovered",
                old_serial=old.serial,
                expired_for_s=round(time.time() - old.not_after),
            )
        else:
            reply = await mesh.request(REGISTRY, "renew", RenewRequest(), CertificateReply)
            new = mesh.verifier.verify(reply.raw())
            if (new.agent, new.instance, new.sign_pk, new.box_pk) != (
                old.agent,
                old.instance,
                old.sign_pk,
                old.box_pk,
            ):
                raise PermissionDenied("registry returned a certificate for other keys")
        await self._replace_certificate(new)
        log.info("mesh.certificate_renewed", serial=new.serial, not_after=new.not_after)
        return new
