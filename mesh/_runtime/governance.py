"""Governance inside each agent process: the policy it runs, the revocations it honours, the
renewal of its certificate, rate limits, and reports of denials to the registry.

Fail static: the last policy that verified stays in force while the registry or JetStream is
away; the watches are re-created after a reconnect and catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

from mesh._core.identity import Certificate
from mesh._core.policy import PolicyEngine, Route, parse_canonical
from mesh._core.ratelimit import RateLimiter, TokenBucket
from mesh._log import get_logger
from mesh._runtime.agent import Peer
from mesh._runtime.concurrency import cancel_and_wait
from mesh._runtime.control import ControlStore
from mesh._runtime.ports import MeshHandle
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

__all__ = ["Governance"]

log = get_logger(__name__)


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
        self.limiter = RateLimiter()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self._reports = TokenBucket(20.0, 50)
        self._suppressed = 0
        self._store: ControlStore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._policy_ready = asyncio.Event()
        self._policy_seen = asyncio.Event()
        self._revocations_ready = asyncio.Event()
        self._policy_unauthenticated = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, store: ControlStore, timeout: float) -> None:
        """Load the current policy and revocations, then keep watching them.

        Raises:
            Unavailable: they could not be read within ``timeout``.
            FailedPrecondition: the mesh's current policy is not signed by this agent's trust
                root (a wrong ``--root``); a mesh with no policy yet starts.
        """
        self._store = store
        self.restart_watches()
        try:
            await asyncio.wait_for(
                asyncio.gather(self._policy_ready.wait(), self._revocations_ready.wait()),
                timeout,
            )
        except TimeoutError:
            raise Unavailable("policy and revocations did not load in time") from None
        if self.revision is None and self._policy_unauthenticated:
            await self.close()
            raise FailedPrecondition(
                f"this agent's trust root {self._mesh.trust_root.key_id} is not the mesh's: "
                "the current policy is not signed by it; check --root / MESH_TRUST_ROOT"
            )
        self._tasks["renew"] = asyncio.create_task(self._renew_loop(), name="mesh-renew")

    def restart_watches(self) -> None:
        """(Re-)create the policy and revocation watches, e.g. after a reconnect."""
        for name, run in (("policy", self._watch_policy), ("revoked", self._watch_revocations)):
            old = self._tasks.pop(name, None)
            if old is not None:
                old.cancel()
            self._tasks[name] = asyncio.create_task(run(), name=f"mesh-watch-{name}")

    async def close(self) -> None:
        await cancel_and_wait(self._tasks.values())
        self._tasks.clear()

    async def _watch(
        self,
        open_watch: Callable[[], AsyncIterator[object]],
        apply: Callable[[object], None],
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
        await self._watch(self._store.watch_policy, self._apply_policy, self._policy_ready)

    async def _watch_revocations(self) -> None:
        assert self._store is not None
        await self._watch(
            self._store.watch_revocations, self._apply_revocation, self._revocations_ready
        )

    # --- policy ------------------------------------------------------------------------------

    def _apply_policy(self, raw: object) -> None:
        assert self._store is not None and isinstance(raw, bytes)
        try:
            rev = self._store.decode_policy(raw)
            policy = parse_canonical(rev.policy_json, source=rev.source)
        except Exception as exc:
            # NACK: keep serving on the last good policy and say why in the directory.
            self._policy_unauthenticated = isinstance(exc, Unauthenticated)
            self.error = exc.message if isinstance(exc, MeshError) else type(exc).__name__
            log.error("mesh.policy_refused", error=self.error)
        else:
            if self.revision is not None and rev.revision <= self.revision:
                return
            self.engine = PolicyEngine(policy, revision=rev.revision, source=rev.source)
            self.revision = rev.revision
            self.error = None
            log.info("mesh.policy_applied", revision=rev.revision, source=rev.source)
        self._policy_seen.set()
        self._policy_seen = asyncio.Event()
        self._policy_changed()

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

    def _apply_revocation(self, item: object) -> None:
        serial = getattr(item, "serial", None)
        if isinstance(serial, str):
            self._mesh.verifier.revoked.add(serial)
            if serial == self._mesh.identity.certificate.serial:
                log.error("mesh.own_certificate_revoked", serial=serial)
                if self._own_revoked is not None:
                    self._own_revoked()

    def outgoing(self, agent: str, endpoint: str) -> Route:
        """The route of a call this instance makes; the caller's own check fails fast.

        Raises:
            PermissionDenied: naming the rule.
        """
        me = self._mesh.identity.certificate
        route = self.engine.route(me.agent, me.roles, agent, endpoint)
        decision = route.decision
        if not decision.allowed and agent != REGISTRY:
            # The control plane is always reachable; it enforces its own rules.
            raise PermissionDenied(
                f"{me.agent} may not call {agent}.{endpoint}: "
                + decision.explain(self.engine.source, self.engine.revision),
                rule=decision.rule,
            )
        return route

    def incoming(self, caller: Peer, endpoint: str) -> Route:
        """The route of a request this instance serves, decided before the handler runs:
        authorization (counted, denials reported) then the rate-limit take.

        Raises:
            PermissionDenied: naming the rule that decided.
            ResourceExhausted: the rate limit is spent, with ``retry_after``.
        """
        name = self._mesh.name
        route = self.engine.route(caller.agent, caller.roles, name, endpoint)
        me = self._mesh.identity.certificate
        if not (me.agent == REGISTRY and REGISTRY in me.roles):
            # (The registry checks roles itself: admin for everything but renew.)
            decision = route.decision
            if decision.allowed and not decision.audit_only:
                self.decisions[("allow", decision.rule)] += 1
            else:
                self.decisions[("deny" if not decision.allowed else "audit", decision.rule)] += 1
                self._report(caller, endpoint, decision.rule, decision.audit_only)
                if not decision.allowed:
                    raise PermissionDenied(
                        f"{caller.agent} may not call {name}.{endpoint}: "
                        + decision.explain(self.engine.source, self.engine.revision),
                        rule=decision.rule,
                    )
        if route.rate_limit is not None:
            wait = self.limiter.take(caller.agent, name, endpoint, route.rate_limit)
            if wait is not None:
                raise ResourceExhausted(
                    f"rate limit of {name}.{endpoint} exceeded for {caller.agent}",
                    retry_after=wait,
                )
        return route

    def _report(self, caller: Peer, endpoint: str, rule: str, audit_only: bool) -> None:
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
        mesh = self._mesh
        while True:
            cert = mesh.identity.certificate
            await asyncio.sleep(max(0.0, self.renew_at(cert) - time.time()))
            delay = 1.0
            while mesh.identity.certificate is cert:
                try:
                    await self.renew_now()
                except MeshError as exc:
                    left = cert.not_after - time.time()
                    log.warning("mesh.renewal_failed", error=exc.message, expires_in_s=round(left))
                    await asyncio.sleep(min(delay, max(1.0, left / 10)))
                    delay = min(delay * 2, 60.0)

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
