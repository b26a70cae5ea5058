"""Freshness of the control plane: the registry's head keeper, and the state an agent saves.

``HeadKeeper`` runs in each registry instance. It signs a new head (``mesh._core.head``) at
once after every policy apply and revocation, soon after audit appends, and at least every
``refresh`` seconds, so a head an agent holds is never older than that while the registry is
up. Each round it also repairs what the broker may have done to the stores: a store deleted is
re-created, a ``current`` policy that is not the one the head names is put back, revocations
the head lists are re-stored, and an audit log shorter than the head counts is recorded as a
loss. Every repair is audited and logged.

``SavedState`` keeps, in an agent's state directory, the newest head and policy it accepted,
so a restarted agent refuses anything older, and can start on its last policy when the store
lost it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import replace
from pathlib import Path

from mesh._core.head import Head, live_revocations
from mesh._core.identity import write_private_file
from mesh._core.names import directory_bucket
from mesh._log import get_logger
from mesh._runtime.concurrency import cancel_and_wait
from mesh._runtime.control import AUDIT_LOST, AuditRecord, ControlStore, PolicyRevision, Revocation
from mesh.errors import FailedPrecondition, MeshError

__all__ = ["HeadKeeper", "SavedState"]

log = get_logger(__name__)

MIN_GAP = 0.5  # seconds between heads signed for audit appends (policy and revocations: at once)


class SavedState:
    """Signed documents an agent keeps across restarts: files ``state/<name>-<prefix>``
    (mode 0600) in its state directory. They are verified again when read, so a file edited
    by someone else is as good as absent. Deleting ``state/`` makes the agent trust the next
    unexpired head it reads, as on its first start.

    Args:
        directory: the agent's state directory (``None``: nothing is kept).
        prefix: the mesh's subject prefix.
    """

    def __init__(self, directory: str | Path | None, prefix: str) -> None:
        self._dir = Path(directory) / "state" if directory is not None else None
        self._prefix = prefix

    def load(self, name: str) -> bytes | None:
        if self._dir is None:
            return None
        try:
            return (self._dir / f"{name}-{self._prefix}").read_bytes()
        except OSError:
            return None

    def save(self, name: str, raw: bytes) -> None:
        if self._dir is None:
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            write_private_file(self._dir / f"{name}-{self._prefix}", raw)
        except OSError as exc:
            log.warning("mesh.state_not_saved", file=name, error=str(exc))


class HeadKeeper:
    """Signs heads and repairs the stores, for one registry instance.

    Args:
        store: the control store, with the root's private key.
        refresh: seconds between heads when nothing changes.
        ttl: how long a head is valid (``expires_at - issued_at``).
        state: where the newest head and policy are kept across restarts.
        actor: who the repairs are audited as.
    """

    def __init__(
        self,
        store: ControlStore,
        *,
        refresh: float,
        ttl: float,
        state: SavedState,
        actor: str,
    ) -> None:
        if not store.root.can_sign:
            raise FailedPrecondition("signing heads needs the trust root's private key")
        self.store = store
        self.refresh = refresh
        self.ttl = ttl
        self._state = state
        self._actor = actor
        self.head: Head | None = None
        self.policy: PolicyRevision | None = None
        self._policy_raw: bytes | None = None
        self._revocations: dict[str, bytes] = {}
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._directory_id: str | None = None

    # --- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the newest verified state (store, saved files), sign a head, keep going.

        Raises:
            Unavailable: JetStream could not be reached.
        """
        await self._load()
        await self.sign()
        self.store.on_audit_appended = self._dirty.set
        self._task = asyncio.create_task(self._run(), name="mesh-head-keeper")

    async def close(self) -> None:
        self.store.on_audit_appended = None
        await cancel_and_wait([self._task])

    async def _load(self) -> None:
        store = self.store
        stored, _ = await store.head_entry()
        saved_raw = self._state.load("registry-head")
        saved = None
        if saved_raw is not None:
            with contextlib.suppress(MeshError):
                saved = store.decode_head(saved_raw)
        heads = [h for h in (stored, saved) if h is not None]
        self.head = max(heads, key=lambda h: h.version) if heads else None
        # The policy: the one the newest head names, found in the store or the saved file.
        current, _ = await store.policy_entry()
        want = self.head.policy_sha256 if self.head is not None else None
        want_rev = self.head.policy_revision if self.head is not None else None
        if want is None or want_rev is None:
            # No head yet (a mesh from before heads, or a new one): adopt the newest revision
            # that verifies.
            history = await store.policy_history()
            if current is not None:
                history.append(current)
            if history:
                self.policy = max(history, key=lambda r: r.revision)
                found = await store.policy_named(self.policy.revision, self.policy.sha256)
                self._policy_raw = found[1] if found else None
        else:
            found = await store.policy_named(want_rev, want)
            saved_policy = self._state.load("registry-policy")
            if found is None and saved_policy is not None:
                with contextlib.suppress(MeshError):
                    rev = store.decode_policy(saved_policy)
                    if (rev.revision, rev.sha256) == (want_rev, want):
                        found = (rev, saved_policy)
            if found is None:
                log.error(
                    "registry.policy_lost",
                    revision=self.head.policy_revision if self.head else None,
                    sha256=want,
                )
            else:
                self.policy, self._policy_raw = found
        self._revocations = {s: raw for s, (_r, raw) in (await store.revocation_entries()).items()}

    # --- what the registry tells it ----------------------------------------------------------

    def next_revision(self, current: PolicyRevision | None) -> int:
        """The number of the next policy revision: one past every revision this mesh has
        signed that is known here (the head's, the verified current, the kept history); never
        reused, even when the store was emptied."""
        known = [0]
        if self.head is not None and self.head.policy_revision is not None:
            known.append(self.head.policy_revision)
        for rev in (self.policy, current):
            if rev is not None:
                known.append(rev.revision)
        return max(known) + 1

    async def policy_applied(self, rev: PolicyRevision, raw: bytes) -> None:
        """A revision was stored as ``current``: name it in a head now."""
        self.policy, self._policy_raw = rev, raw
        self._state.save("registry-policy", raw)
        await self.sign()

    async def revoked(self, revocation: Revocation, raw: bytes) -> None:
        """A revocation was stored: list it in a head now."""
        self._revocations[revocation.serial] = raw
        await self.sign(extra_revoked=[(revocation.serial, revocation.not_after)])

    # --- signing -----------------------------------------------------------------------------

    async def sign(self, extra_revoked: list[tuple[str, int]] | None = None) -> Head:
        """Sign and store the next head (compare-and-set; another registry's newer head is
        adopted and signed over).

        Raises:
            Unavailable: JetStream could not be reached.
            FailedPrecondition: the head key is too contended.
        """
        async with self._lock:
            for _ in range(10):
                stored, expect = await self.store.head_entry()
                base = self.head
                if stored is not None and (base is None or stored.version > base.version):
                    base = stored  # another registry instance signed meanwhile
                now = time.time()
                revoked = list(base.revoked) if base is not None else []
                revoked += extra_revoked or []
                revoked += [
                    (r.serial, r.not_after)
                    for r, _ in (await self.store.revocation_entries()).values()
                ]
                last = await (await self.store.audit_stream()).last()
                policy = self.policy
                if (
                    base is not None
                    and base.policy_revision is not None
                    and (policy is None or policy.revision < base.policy_revision)
                ):
                    # Another registry instance applied a newer revision: follow it.
                    found = await self.store.policy_named(
                        base.policy_revision, base.policy_sha256 or ""
                    )
                    if found is not None:
                        self.policy, self._policy_raw = found
                        policy = self.policy
                head = Head(
                    prefix=self.store.prefix,
                    version=(base.version if base is not None else 0) + 1,
                    issued_at=now,
                    expires_at=now + self.ttl,
                    policy_revision=policy.revision if policy is not None else None,
                    policy_sha256=policy.sha256 if policy is not None else None,
                    revoked=live_revocations(revoked, now),
                    audit_length=last[0] if last else 0,
                    audit_hash=_sha256(last[1]) if last else "",
                )
                if base is not None and policy is None and base.policy_revision is not None:
                    # The named policy is lost everywhere this instance can look: keep naming
                    # it (agents keep running it) rather than sign "no policy".
                    head = replace(
                        head,
                        policy_revision=base.policy_revision,
                        policy_sha256=base.policy_sha256,
                    )
                try:
                    raw = await self.store.write_head(head, expect)
                except FailedPrecondition:
                    continue
                self.head = head
                self._state.save("registry-head", raw)
                return head
            raise FailedPrecondition("the head is too contended to sign")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.refresh)
            self._dirty.clear()
            try:
                await self.repair()
                await self.sign()
            except MeshError as exc:
                log.warning("registry.head_failed", error=exc.message)
            await asyncio.sleep(MIN_GAP)

    # --- repairs -----------------------------------------------------------------------------

    async def repair(self) -> list[str]:
        """Put the stores back into the state the head names; return what was repaired.

        Raises:
            Unavailable: JetStream could not be reached.
        """
        store = self.store
        fixed = [f"store {name} was deleted and is re-created" for name in await store.recover()]
        # The directory bucket is re-created by its writers and watchers (``DirectoryBucket``);
        # the keeper notices the new incarnation so that the fact is audited too.
        directory = directory_bucket(store.prefix)
        incarnation = await store.transport.bucket_id(directory)
        if incarnation is not None:
            if self._directory_id is not None and incarnation != self._directory_id:
                fixed.append(f"store {directory} was deleted and is re-created by its writers")
            self._directory_id = incarnation
        current, expect = await store.policy_entry()
        policy = self.policy
        if (
            self._policy_raw is not None
            and policy is not None
            and (current is None or current.sha256 != policy.sha256)
        ):
            what = "missing" if expect is None else "not the revision the head names"
            with contextlib.suppress(FailedPrecondition):
                await store.put_policy_raw(self._policy_raw, expect)
                fixed.append(f"current policy was {what}: revision {policy.revision} put back")
        present = await store.revocation_entries()
        for serial, raw in self._revocations.items():
            if serial not in present:
                await store.put_revocation_raw(serial, raw)
                fixed.append(f"revocation of {serial} put back")
        head = self.head
        if head is not None and head.audit_length > 0:
            stream = await store.audit_stream()
            last = await stream.last()
            held = last is not None and last[0] >= head.audit_length
            at = await stream.read(head.audit_length) if held else []
            if not (at and at[0][0] == head.audit_length and _sha256(at[0][1]) == head.audit_hash):
                found = last[0] if last else 0
                log.error(
                    "registry.audit_records_lost",
                    expected=head.audit_length,
                    found=found,
                    head_version=head.version,
                )
                await store.append_audit(
                    AuditRecord(
                        kind=AUDIT_LOST,
                        actor=self._actor,
                        subject="audit",
                        details={
                            "expected_length": head.audit_length,
                            "expected_hash": head.audit_hash,
                            "found_length": found,
                            "head_version": head.version,
                        },
                    )
                )
                fixed.append(f"audit log cut short at {found} of {head.audit_length} records")
                # The next head counts the log as it now is; the loss stays in the chain.
                self.head = replace(head, audit_length=0, audit_hash="")
        for what in fixed:
            log.warning("registry.store_repaired", repair=what)
            if not what.startswith("audit log"):
                with contextlib.suppress(MeshError):
                    await store.append_audit(
                        AuditRecord(
                            kind="store.repaired",
                            actor=self._actor,
                            subject="control plane",
                            details={"repair": what},
                        )
                    )
        return fixed


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
