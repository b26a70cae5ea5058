"""``ClaimStore``: keyed calls to non-idempotent endpoints run once across instances.

The server's ``dedupe`` stage (``mesh._runtime.server``) asks ``acquire`` before it queues a
keyed request for a non-idempotent endpoint. ``acquire`` creates the request's claim in the
replicated bucket ``<prefix>-claims`` with a compare-and-set create, so one instance of the
agent wins; the winner gets a ``HeldClaim`` and records the outcome in it (``finish``), or
says that the handler never started (``release``) or was stopped while running (``abort``).
An instance that finds a claim instead answers with its outcome, waits for it while the
writer lives (within the request's deadline), or raises an honest ``FailedPrecondition``
("outcome unknown") when nothing says what happened: it never runs the handler a second
time. The record format and the decisions are the pure ``mesh._core.claims``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mesh._core.claims import (
    STATE_ABORTED,
    STATE_DONE,
    STATE_RELEASED,
    STATE_RUNNING,
    Claim,
    ClaimSecret,
    Outcome,
    Verdict,
    claim_wrap_key,
    decide,
    decode_claim,
    encode_claim,
    new_content_key,
    open_secret,
    seal_secret,
    unwrap_content_key,
    wrap_content_key,
)
from mesh._core.crypto import PairKeys
from mesh._core.identity import CertificateVerifier
from mesh._core.names import claim_key, claims_bucket
from mesh._core.records import STATE_DRAINING
from mesh._log import get_logger
from mesh._runtime.ports import MeshHandle
from mesh._transport.base import KeyValueBucket, Transport
from mesh.errors import DecodeError, FailedPrecondition, InvalidArgument, MeshError, Unavailable

__all__ = ["CLAIM_HISTORY", "ClaimStore", "HeldClaim"]

log = get_logger(__name__)
T = TypeVar("T")

CLAIM_HISTORY = 4
"""Values kept per claim key: more than one claim's writes (running, then done; at most
released, running, done), so that the bucket's stream has no deleted messages of its own
making: a gap in it is someone else's deletion."""
CLAIM_GRACE = 2.0
"""Seconds after a claim's deadline within which its writer still records the outcome (the
handler is cancelled at the deadline; the write follows at once)."""
_POLL_FIRST = 0.02
_POLL_MAX = 0.25
_WRITE_TIMEOUT = 2.0  # retrying an outcome write through a leader election or a reconnect


@dataclass(slots=True)
class HeldClaim:
    """A claim this instance created (or took over): it runs the handler and records the end."""

    store: ClaimStore
    key: str
    revision: int
    nonce: bytes
    content_key: bytes
    wraps: dict[str, bytes]
    fingerprint: bytes
    deadline: float

    async def finish(self, status: str, payload: bytes) -> None:
        """Record the outcome (before the reply is sent, so a delivered reply is always on
        record). A reply too large for the record keeps its status only."""
        outcome = ClaimSecret(self.fingerprint, Outcome(status, payload))
        raw = self._record(STATE_DONE, outcome)
        if len(raw) > self.store.max_value:
            raw = self._record(STATE_DONE, ClaimSecret(self.fingerprint, Outcome(status, None)))
        await self._write(raw, STATE_DONE)

    async def release(self) -> None:
        """The handler never started (queued past the deadline, invalid body): another
        attempt, here or elsewhere, may take the claim over and run it."""
        await self._write(self._record(STATE_RELEASED, ClaimSecret(self.fingerprint)), "released")

    async def abort(self) -> None:
        """The handler was cancelled while running (a drain): it may have run in part, so
        nobody may run it again; duplicates get the honest error."""
        await self._write(self._record(STATE_ABORTED, ClaimSecret(self.fingerprint)), "aborted")

    def _record(self, state: str, secret: ClaimSecret) -> bytes:
        return self.store.record(
            self.key, self.nonce, state, self.content_key, self.wraps, secret, self.deadline
        )

    async def _write(self, raw: bytes, what: str) -> None:
        store = self.store
        try:
            kv = await store.bucket()
            self.revision = await store.retrying(
                lambda: kv.update(self.key, raw, self.revision), time.monotonic() + _WRITE_TIMEOUT
            )
        except MeshError as exc:
            # A duplicate will find the claim still running and, past its deadline, answer
            # "outcome unknown": honest, only less helpful.
            store.counts["unrecorded"] += 1
            log.warning("mesh.claim_unrecorded", key=self.key, state=what, error=exc.message)


class ClaimStore:
    """The claims of one serving instance.

    Args:
        mesh: the running mesh: its identity (signing key, certificate) and directory.
        transport: the broker connection.
        verifier: checks claim writers' certificates.
        pair: this instance's pair keys (the wrap keys derive from them).
        window: how long claims are kept (the bucket's max age).
        max_future: how far ahead a claim's signing time may be.
        max_value: the largest record kept; a larger outcome keeps its status only.
        replicas: the bucket's replicas, as for the other stores.
    """

    def __init__(
        self,
        *,
        mesh: MeshHandle,
        transport: Transport,
        verifier: CertificateVerifier,
        pair: PairKeys,
        window: float,
        max_future: float,
        max_value: int,
        replicas: int | None,
    ) -> None:
        self._mesh = mesh
        self._transport = transport
        self._verifier = verifier
        self._pair = pair
        self.window = window
        self._max_future = max_future
        self.max_value = max_value
        self._replicas = replicas
        self.name = claims_bucket(mesh.config.prefix)
        self.run = os.urandom(16)  # this incarnation: a restart under the same id is another
        self._kv: KeyValueBucket | None = None
        self._incarnation: str | None = None
        self._opening = asyncio.Lock()
        self._wrap_keys: dict[bytes, bytes] = {}
        self.counts: Counter[str] = Counter()

    async def bucket(self) -> KeyValueBucket:
        """The claims bucket, created (replicated like the other stores) on first use."""
        kv = self._kv
        if kv is not None:
            return kv
        async with self._opening:
            if self._kv is None:
                self._kv = await self._transport.key_value(
                    self.name, ttl=self.window, replicas=self._replicas, history=CLAIM_HISTORY
                )
                incarnation = await self._transport.bucket_id(self.name)
                if self._incarnation is not None and incarnation != self._incarnation:
                    # Every claim made before is gone: a retry of one of them may run again.
                    self.counts["bucket_replaced"] += 1
                    log.warning("mesh.claims_bucket_replaced", bucket=self.name)
                self._incarnation = incarnation
            return self._kv

    async def retrying(self, op: Callable[[], Awaitable[T]], until: float) -> T:
        """Run a bucket operation, retrying ``Unavailable`` until ``until`` (monotonic); a
        deleted bucket is re-created first."""
        delay = _POLL_FIRST
        while True:
            try:
                return await op()
            except Unavailable:
                if time.monotonic() + delay >= until:
                    raise
                try:
                    if await self._transport.bucket_id(self.name) is None:
                        # Deleted (by someone with rights on the broker): create it again.
                        self._transport.forget_bucket(self.name)
                        self._kv = None
                        await self.bucket()
                except MeshError:
                    pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    def record(
        self,
        key: str,
        nonce: bytes,
        state: str,
        content_key: bytes,
        wraps: dict[str, bytes],
        secret: ClaimSecret,
        deadline: float,
    ) -> bytes:
        """A claim record signed by this instance."""
        identity = self._mesh.identity
        return encode_claim(
            identity.keys.signing,
            identity.certificate,
            key=key,
            run=self.run,
            nonce=nonce,
            ts=time.time(),
            deadline=deadline,
            state=state,
            wraps=wraps,
            box=seal_secret(content_key, key, secret),
        )

    def _wrap_key(self, box_pk: bytes) -> bytes:
        key = self._wrap_keys.get(box_pk)
        if key is None:
            if len(self._wrap_keys) >= 4096:
                self._wrap_keys.pop(next(iter(self._wrap_keys)))
            key = self._wrap_keys[box_pk] = claim_wrap_key(self._pair.get(box_pk))
        return key

    def _wraps(self, key: str, content_key: bytes) -> dict[str, bytes]:
        """The content key for this instance and every live instance of the agent: any of
        them may get the retry."""
        identity = self._mesh.identity
        readers = {identity.instance: identity.keys.box_pk}
        for record in self._mesh.directory.instances(identity.agent):
            readers.setdefault(record.instance, record.certificate.box_pk)
        return {
            instance: wrap_content_key(self._wrap_key(box_pk), content_key, key, instance)
            for instance, box_pk in readers.items()
        }

    def _secret(self, claim: Claim) -> ClaimSecret | None:
        instance = self._mesh.instance
        wrapped = claim.wraps.get(instance)
        if wrapped is None:
            return None
        content_key = unwrap_content_key(
            self._wrap_key(claim.certificate.box_pk), wrapped, claim.key, instance
        )
        return None if content_key is None else open_secret(content_key, claim.key, claim.box)

    def _owner_gone(self, claim: Claim) -> bool:
        """Signed evidence that the claim's writer will never record its outcome."""
        if claim.certificate.instance == self._mesh.instance:
            return claim.run != self.run  # an earlier incarnation of this instance
        directory = self._mesh.directory
        if not directory.is_gone(claim.owner):
            return False
        listed = directory.get(claim.owner)
        return listed is None or listed.state != STATE_DRAINING  # a draining one finishes

    async def acquire(
        self, *, caller: str, endpoint: str, ik: str, fingerprint: bytes, deadline: float
    ) -> HeldClaim | Outcome | None:
        """Claim a keyed call before its handler runs.

        Returns:
            A ``HeldClaim``: this instance runs the handler. An ``Outcome``: the first
            execution's, to answer with. ``None``: the deadline passed while the claim was
            running elsewhere (nothing is answered; the caller has stopped waiting).

        Raises:
            FailedPrecondition: the outcome is unknown and the first execution may have run
                (its writer is gone without one, it was stopped, the record was deleted or
                does not verify, ...): the handler is not run again.
            InvalidArgument: the key was used for a different request body.
            Unavailable: the bucket, or this agent's instances in the directory, could not be
                reached before the deadline (nothing ran).
        """
        agent = self._mesh.name
        directory = self._mesh.directory
        if not directory.loaded(agent):  # the first claim: its readers are this agent's instances
            await directory.watch_agent(agent, max(0.1, deadline - time.time()))
        key = claim_key(agent, caller, endpoint, ik)
        nonce, content_key = os.urandom(16), new_content_key()
        wraps = self._wraps(key, content_key)
        raw = self.record(
            key, nonce, STATE_RUNNING, content_key, wraps, ClaimSecret(fingerprint), deadline
        )
        held = HeldClaim(self, key, 0, nonce, content_key, wraps, fingerprint, deadline)
        until = time.monotonic() + max(0.0, deadline - time.time())
        what = f"idempotency key {ik!r} of {agent}.{endpoint}"

        def unknown(reason: str) -> FailedPrecondition:
            self.counts["unknown"] += 1
            log.warning("mesh.claim_outcome_unknown", key=key, reason=reason)
            return FailedPrecondition(
                f"outcome unknown: {what}: {reason}; the first execution may have run, "
                "so it is not run again"
            )

        try:
            kv = await self.bucket()
            created = await self._create(kv, key, raw, until)
        except Unavailable as exc:
            raise Unavailable(
                f"the claims store is unreachable, {what} was not run: {exc.message}"
            ) from None
        if created is not None:
            held.revision = created
            self.counts["claimed"] += 1
            return held
        delay, rechecked = _POLL_FIRST, False
        while True:
            try:
                found = await self.retrying(lambda: kv.entry(key), until)
            except Unavailable:
                return None
            if found is None:
                # Our create failed, so something was stored: a delete marker. This protocol
                # never deletes a claim; someone with rights on the broker did.
                self.counts["deleted"] += 1
                raise unknown("its claim was deleted from the claims bucket")
            value, revision = found
            try:
                claim = decode_claim(
                    value, self._verifier, key=key, agent=agent, now=time.time(),
                    window=self.window, max_future=self._max_future,
                )  # fmt: skip
            except (DecodeError, MeshError) as exc:
                self.counts["refused"] += 1
                raise unknown(f"its claim record does not verify ({exc.message})") from None
            decision = decide(
                claim,
                self._secret(claim),
                fingerprint=fingerprint,
                mine=claim.run == self.run and claim.nonce == nonce,
                owner_gone=self._owner_gone(claim),
                now=time.time(),
                grace=CLAIM_GRACE,
            )
            verdict = decision.verdict
            if verdict is Verdict.RUN:
                held.revision = revision
                self.counts["claimed"] += 1
                return held
            if verdict is Verdict.TAKE:
                try:
                    held.revision = await self.retrying(
                        lambda: kv.update(key, raw, revision),  # noqa: B023 (awaited at once)
                        until,
                    )
                except FailedPrecondition:
                    continue  # another instance took it first: read it again
                except Unavailable:
                    return None
                self.counts["taken_over"] += 1
                return held
            if verdict is Verdict.REPLAY:
                assert decision.outcome is not None
                self.counts["replayed"] += 1
                return decision.outcome
            if verdict is Verdict.CONFLICT:
                raise InvalidArgument(f"{what} was already used for a different request")
            if verdict is Verdict.UNKNOWN:
                if claim.state == STATE_RUNNING and not rechecked:
                    rechecked = True  # the writer may have recorded it just before it left
                    continue
                raise unknown(decision.reason)
            self.counts["waited"] += 1
            left = until - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX)

    async def _create(self, kv: KeyValueBucket, key: str, raw: bytes, until: float) -> int | None:
        """The claim's revision if this create stored it; ``None`` if the key was stored.
        A create whose answer was lost is tried again: the second finds the first's record,
        which ``decide`` recognises as this request's own (same incarnation and nonce)."""
        try:
            return await self.retrying(lambda: kv.create_fresh(key, raw), until)
        except FailedPrecondition:
            return None
