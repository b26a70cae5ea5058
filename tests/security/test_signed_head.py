"""The signed head against a broker-level attacker (plain nats-py, NATS credentials only):
the stores can be rewritten, rolled back, purged or deleted, and the mesh neither fails open,
nor goes back to older state, nor loses a revocation, nor hides a truncated audit log."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nats
import pytest
from pydantic import BaseModel

import mesh
from mesh.control_plane import ApplyReply, ApplyRequest, RevokeReply, RevokeRequest, TrustRoot
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration

OPEN = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: open}
spec:
  defaults: {authorization: allow}
"""

CLOSED = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: closed}
spec:
  defaults: {authorization: deny}
  rules:
    - name: carol-may-echo
      allow: {callers: [carol], agent: bob, endpoints: [echo]}
"""


class Msg(BaseModel):
    text: str


def make_bob(calls: Counter[str]) -> mesh.Agent:
    bob = mesh.Agent("bob")

    @bob.endpoint(idempotent=True)
    async def echo(m: Msg, ctx: mesh.Context) -> Msg:
        calls[ctx.caller.agent] += 1
        return m

    return bob


@dataclass
class World:
    server: NatsServer
    root: TrustRoot
    cfg: mesh.MeshConfig
    strict: mesh.MeshConfig  # fail closed: no development mode
    stack: AsyncExitStack
    admin: mesh.Mesh
    registry: mesh.Mesh
    tmp: Path

    async def join(
        self, name: str, agent: mesh.Agent | None = None, *, state: str | None = None
    ) -> mesh.Mesh:
        cfg = self.strict
        if state is not None:
            cfg = mesh.MeshConfig(**{**_fields(cfg), "state_dir": str(self.tmp / state)})
        ident = self.root.issue_identity(name)
        return await self.stack.enter_async_context(mesh.Mesh(ident, cfg, agent=agent))

    async def apply(self, text: str) -> int:
        reply = await self.admin.request(
            "registry", "apply", ApplyRequest(policy=text, source="t.yaml"), ApplyReply
        )
        return reply.revision


def _fields(cfg: mesh.MeshConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


@pytest.fixture
async def world(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    timeouts = mesh.Timeouts(request=3.0, connect=10.0, drain=1.0, head_refresh=0.5)
    cfg = test_config([nats_server.url], timeouts=timeouts, signals_interval=0)
    strict = mesh.MeshConfig(**{**_fields(cfg), "allow_no_policy": False})
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(
            mesh.Mesh(
                root.issue_identity("registry", roles=["registry"]),
                mesh.MeshConfig(**{**_fields(cfg), "state_dir": str(tmp_path / "registry")}),
                agent=reg.registry,
                trust_root=root,
            )
        )
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), watching_all(strict))
        )
        await admin.wait_for("registry")
        yield World(nats_server, root, cfg, strict, stack, admin, registry, tmp_path)


async def attacker(world: World) -> nats.NATS:
    return await nats.connect(world.server.url)


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_unsigned_current_policy_neither_opens_a_new_agent_nor_blocks_apply(
    world: World,
) -> None:
    """Item 1: garbage in the policy store's `current` key: an agent that starts afterwards
    runs the revision the signed head names (not "no policy"), and `apply` still works."""
    calls: Counter[str] = Counter()
    rev = await world.apply(CLOSED)
    nc = await attacker(world)
    kv = await nc.jetstream().key_value("mesh-policy")
    await kv.put("current", msgpack.packb([msgpack.packb({"revision": 99}), b"\0" * 64]))
    await kv.put("current", b"not even msgpack")
    bob = await world.join("bob", make_bob(calls))
    assert bob.governance.revision == rev
    alice = await world.join("alice")
    await alice.wait_for("bob")
    with pytest.raises(mesh.PermissionDenied):
        await alice.request("bob", "echo", Msg(text="x"), Msg)
    assert calls["alice"] == 0
    # The admin repairs the normal way, while `current` still holds garbage.
    await kv.put("current", b"garbage again")
    rev2 = await world.apply(OPEN)
    assert rev2 == rev + 1
    await bob.governance.wait_for_revision(rev2)
    await nc.close()


async def test_no_head_means_no_start_rather_than_no_policy(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Fail closed: an agent of a mesh with no signed head (the head deleted, no registry)
    does not start with "everything allowed"; it says what to do."""
    root = TrustRoot.generate()
    cfg = test_config(
        [nats_server.url],
        allow_no_policy=False,
        timeouts=mesh.Timeouts(request=3.0, connect=2.0, drain=1.0),
    )
    with pytest.raises(mesh.FailedPrecondition, match="no signed head"):
        async with mesh.Mesh(root.issue_identity("bob"), cfg, agent=make_bob(Counter())):
            pass


async def test_an_old_revision_and_an_old_head_put_back_are_refused(world: World) -> None:
    """Item 2: the attacker re-puts the old permissive revision and the head that named it:
    running agents refuse the older head, a restarted agent with saved state refuses it too,
    and the registry's next revision number is not reused."""
    calls: Counter[str] = Counter()
    rev1 = await world.apply(OPEN)
    nc = await attacker(world)
    js = nc.jetstream()
    head_kv = await js.key_value("mesh-head")
    policy_kv = await js.key_value("mesh-policy")
    old_head = (await head_kv.get("head")).value
    old_policy = (await policy_kv.get("current")).value
    rev2 = await world.apply(CLOSED)
    bob = await world.join("bob", make_bob(calls), state="bob")
    await bob.governance.wait_for_revision(rev2)
    seen = bob.governance.head
    assert seen is not None

    stop = asyncio.Event()

    async def keep_rolling_back() -> None:
        while not stop.is_set():
            await head_kv.put("head", old_head)
            await policy_kv.put("current", old_policy)
            await asyncio.sleep(0.05)

    roller = asyncio.create_task(keep_rolling_back())
    try:
        await asyncio.sleep(1.0)
        assert bob.governance.revision == rev2  # the running agent did not go back
        # A restart of bob with its saved state: the old head is older than the saved one.
        await bob.drain()
        bob2 = await world.join("bob", make_bob(calls), state="bob")
        assert bob2.governance.revision == rev2
        alice = await world.join("alice")
        await alice.wait_for("bob")
        with pytest.raises(mesh.PermissionDenied):
            await alice.request("bob", "echo", Msg(text="x"), Msg)
        assert calls["alice"] == 0
        rev3 = await world.apply(OPEN)
        assert rev3 == rev2 + 1  # derived from the verified history: never reused
    finally:
        stop.set()
        await roller
    await bob2.governance.wait_for_revision(rev3)
    assert rev1 < rev2 < rev3
    await nc.close()


async def test_deleting_the_policy_store_neither_resets_numbering_nor_strands_agents(
    world: World,
) -> None:
    """Item 2: the policy stream deleted: the registry re-creates it and puts the current
    revision back; the next apply continues the numbering and running agents pick it up."""
    rev = await world.apply(CLOSED)
    bob = await world.join("bob", make_bob(Counter()))
    nc = await attacker(world)
    await nc.jetstream().delete_key_value("mesh-policy")

    async def restored() -> bool:
        current, _ = await world.admin.control.policy_entry()
        return current is not None and current.revision == rev

    await until(restored)
    rev2 = await world.apply(OPEN)
    assert rev2 == rev + 1
    await bob.governance.wait_for_revision(rev2, timeout=5)
    records, _ = await world.admin.control.read_audit()
    assert any(r.kind == "store.repaired" for r in records)
    await nc.close()


async def test_purged_revocations_stay_revoked_after_a_restart(world: World) -> None:
    """Item 3: the revocation store purged (and deleted): an agent started afterwards still
    refuses the revoked certificate (the head lists it), and the registry puts it back."""
    calls: Counter[str] = Counter()
    alice_id = world.root.issue_identity("alice")
    alice = await world.stack.enter_async_context(mesh.Mesh(alice_id, world.strict))
    reply = await world.admin.request(
        "registry", "revoke", RevokeRequest(target=alice_id.certificate.serial), RevokeReply
    )
    assert reply.revoked == [alice_id.certificate.serial]
    nc = await attacker(world)
    js = nc.jetstream()
    kv = await js.key_value("mesh-revoked")
    await kv.purge(alice_id.certificate.serial)
    await js.delete_key_value("mesh-revoked")
    bob = await world.join("bob", make_bob(calls))
    assert alice_id.certificate.serial in bob.verifier.revoked
    await alice.wait_for("bob")
    with pytest.raises(mesh.MeshError):
        await alice.request("bob", "echo", Msg(text="x"), Msg, timeout=1.0)
    assert calls["alice"] == 0

    async def put_back() -> bool:
        return any(
            r.serial == alice_id.certificate.serial for r in await world.admin.control.revocations()
        )

    await until(put_back)
    await nc.close()


async def test_a_deleted_or_truncated_audit_log_does_not_verify(world: World) -> None:
    """Item 4: the audit stream deleted, or re-created with a genuine prefix: verification
    against the signed head fails and says how many records are missing; the registry records
    the loss in the chain so it stays visible."""
    for i in range(6):
        await world.apply(OPEN if i % 2 else CLOSED)
    await until(lambda: _head_counts(world, 7))
    nc = await attacker(world)
    js = nc.jetstream()
    entries = await (await world.admin.control.audit_stream()).read()
    assert len(entries) >= 7
    head = world.admin.governance.head
    assert head is not None and head.audit_length >= 7
    # Re-create with the first half, genuinely signed records in order.
    await js.delete_stream("mesh-audit")
    half = entries[: len(entries) // 2]
    _records, problems = await world.admin.control.read_audit(head)
    assert any("truncated" in p or "deleted" in p for p in problems), problems
    # The read above re-created it, empty, with the mesh's own settings: then it is used as is.
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await js.add_stream(name="mesh-audit", subjects=["mesh.audit"])
    for _seq, raw in half:
        await js.publish("mesh.audit", raw)
    _records, problems = await world.admin.control.read_audit(head)
    assert any(f"holds {len(half)}" in p for p in problems), problems

    # The registry notices and writes the loss into the chain: it stays a problem after the
    # next heads count the shorter log.
    async def loss_recorded() -> bool:
        recs, _ = await world.admin.control.read_audit(head)
        return any(r.kind == "audit.records_lost" for r in recs)

    await until(loss_recorded)
    newest = world.admin.governance.head
    _records, problems = await world.admin.control.read_audit(newest)
    assert any("records were deleted" in p for p in problems), problems
    await nc.close()


async def _head_counts(world: World, n: int) -> bool:
    head = world.admin.governance.head
    return head is not None and head.audit_length >= n


async def test_a_frozen_head_makes_agents_stale_not_silent(world: World) -> None:
    """Freezing: with the registry gone (or heads withheld) past a head's expiry, agents keep
    enforcing their last policy (fail static) and report themselves stale."""
    rev = await world.apply(CLOSED)
    bob = await world.join("bob", make_bob(Counter()))
    await world.registry.drain()
    timeouts = mesh.Timeouts(request=3.0, connect=10.0, drain=1.0, head_refresh=0.3, head_ttl=1.5)
    short = mesh.MeshConfig(**{**_fields(world.cfg), "timeouts": timeouts})
    # Another registry instance, signing short-lived heads; then it stops too.
    async with mesh.Mesh(
        world.root.issue_identity("registry", roles=["registry"]),
        short,
        agent=reg.registry,
        trust_root=world.root,
    ):

        def short_head() -> bool:
            head = bob.governance.head
            return head is not None and head.expires_at - head.issued_at < 2

        await wait_until(short_head)
    assert bob.governance.stale is None
    await wait_until(lambda: bob.governance.stale is not None, timeout=10)
    assert "expired" in (bob.governance.stale or "")
    assert bob.governance.revision == rev
    # ... and says so in its signed directory record (`mesh-policy agents` shows it).
    await wait_until(lambda: any(r.stale for r in world.admin.directory.all() if r.agent == "bob"))


async def test_a_deleted_directory_is_audited(world: World) -> None:
    """Item 8, surfaced: the directory bucket deleted: its writers re-create it (see
    test_directory_deleted.py) and the registry writes the fact into the audit log."""
    nc = await attacker(world)
    await nc.jetstream().delete_key_value("mesh-directory")

    async def audited() -> bool:
        records, _ = await world.admin.control.read_audit()
        return any(
            r.kind == "store.repaired" and "mesh-directory" in str(r.details.get("repair"))
            for r in records
        )

    await until(audited)
    await world.admin.wait_for("registry")  # and the registry is listed again
    await nc.close()
