"""The policy registry end to end on a real nats-server: policy distribution and enforcement,
identity lifecycle, rate limits, fail-static behaviour and the audit log."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import nats
import pytest
from pydantic import BaseModel

import mesh
from mesh._runtime.control import sign_document
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    AuditRecord,
    CertificateVerifier,
    Empty,
    HistoryReply,
    IdentityList,
    PolicyEngine,
    PolicyRevision,
    RevisionInfo,
    RevokeReply,
    RevokeRequest,
    RollbackRequest,
    TokenReply,
    TokenRequest,
    TrustRoot,
    canonical_policy_bytes,
)
from mesh.testing import NatsServer, test_config, wait_until, watching_all
from mesh_agents import registry as reg

POLICIES = Path(__file__).resolve().parents[2] / "policies"

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: test}
spec:
  defaults: {authorization: deny}
  rules:
    - name: alice-may-echo
      allow: {callers: [alice, "role:ops"], agent: bob, endpoints: [echo]}
    - name: nobody-drops
      deny: {callers: ["*"], agent: bob, endpoints: ["drop*"]}
  endpoints:
    bob.echo:
      rate_limit: {per_caller: 5/s, burst: 5}
"""


class Msg(BaseModel):
    text: str


def make_bob(calls: Counter[str]) -> mesh.Agent:
    bob = mesh.Agent("bob")

    @bob.endpoint(idempotent=True)
    async def echo(m: Msg, ctx: mesh.Context) -> Msg:
        calls[ctx.caller.agent] += 1
        return m

    @bob.endpoint(name="drop-all")
    async def drop_all(m: Msg) -> Msg:
        calls["drop"] += 1
        return m

    return bob


@dataclass
class World:
    server: NatsServer
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    admin: mesh.Mesh
    registry: mesh.Mesh

    async def join(
        self, name: str, agent: mesh.Agent | None = None, roles=(), config=None
    ) -> mesh.Mesh:
        ident = self.root.issue_identity(name, roles=roles)
        cfg = config or self.cfg
        return await self.stack.enter_async_context(mesh.Mesh(ident, cfg, agent=agent))

    async def start_registry(self) -> mesh.Mesh:
        ident = self.root.issue_identity("registry", roles=["registry"])
        m = mesh.Mesh(ident, self.cfg, agent=reg.registry, trust_root=self.root)
        await m.start()
        return m

    async def apply(self, text: str, source: str = "test.yaml") -> int:
        await self.admin.wait_for("registry")
        reply = await self.admin.request(
            "registry", "apply", ApplyRequest(policy=text, source=source), ApplyReply
        )
        return reply.revision


@pytest.fixture
async def world(nats_server: NatsServer) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        admin_id = root.issue_identity("admin", roles=["admin"])
        admin = await stack.enter_async_context(mesh.Mesh(admin_id, watching_all(cfg)))
        w = World(nats_server, root, cfg, stack, admin, None)  # type: ignore[arg-type]
        w.registry = await w.start_registry()
        try:
            yield w
        finally:
            await w.registry.drain()


async def acked(m: mesh.Mesh, agent: str, revision: int) -> bool:
    return any(r.agent == agent and r.policy_revision == revision for r in m.directory.all())


async def test_policy_reaches_every_agent_and_each_acknowledges(world: World) -> None:
    """An applied revision is verified, applied and acknowledged by every instance."""
    calls: Counter[str] = Counter()
    bobs = [await world.join("bob", make_bob(calls)) for _ in range(3)]
    rev = await world.apply(POLICY)
    for b in bobs:
        await wait_until(lambda b=b: b.governance.revision == rev)
    await wait_until(
        lambda: (
            sum(r.policy_revision == rev for r in world.admin.directory.all() if r.agent == "bob")
            == 3
        )
    )


async def test_unauthorized_call_is_refused_naming_the_rule(world: World) -> None:
    """The caller fails fast and the callee refuses too, both naming the deciding rule."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    mallory = await world.join("mallory")
    alice = await world.join("alice")
    rev = await world.apply(POLICY)
    for m in (bob, mallory, alice):
        await wait_until(lambda m=m: m.governance.revision == rev)
    assert (await alice.request("bob", "echo", Msg(text="hi"), Msg)).text == "hi"
    with pytest.raises(mesh.PermissionDenied) as local:
        await mallory.request("bob", "echo", Msg(text="x"), Msg)
    assert local.value.rule == "default deny"
    with pytest.raises(mesh.PermissionDenied) as deny_rule:
        await alice.request("bob", "drop-all", Msg(text="x"), Msg)
    assert deny_rule.value.rule == "nobody-drops"
    # Skip mallory's own check: the callee still refuses, and says why.
    mallory.governance.engine = PolicyEngine(None)
    with pytest.raises(mesh.PermissionDenied) as remote:
        await mallory.request("bob", "echo", Msg(text="x"), Msg)
    assert remote.value.rule == "default deny"
    assert "default deny" in remote.value.message
    assert calls["mallory"] == 0 and calls["drop"] == 0
    await wait_until(lambda: bob.governance.decisions[("deny", "default deny")] == 1)


async def test_role_grants_access(world: World) -> None:
    """A rule naming a role admits any agent whose certificate carries it."""
    calls: Counter[str] = Counter()
    await world.join("bob", make_bob(calls))
    carol = await world.join("carol", roles=["ops"])
    rev = await world.apply(POLICY)
    await wait_until(lambda: carol.governance.revision == rev)
    await carol.wait_for("bob")
    assert (await carol.request("bob", "echo", Msg(text="ok"), Msg)).text == "ok"


async def test_forged_policy_is_refused_and_repaired(world: World) -> None:
    """A revision signed by another key put as `current` is refused (agents run what the
    signed head names); the registry puts the genuine revision back and audits the repair."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    rev = await world.apply(POLICY)
    await wait_until(lambda: bob.governance.revision == rev)
    forger = TrustRoot.generate()
    open_policy = canonical_policy_bytes(mesh.parse_policy((POLICIES / "open.yaml").read_text()))
    forged = PolicyRevision(rev + 1, open_policy, "forged", "mallory", time.time())
    nc = await nats.connect(world.server.url)
    try:
        kv = await nc.jetstream().key_value("mesh-policy")
        await kv.put("current", sign_document(forger, asdict(forged)))
    finally:
        await nc.close()

    async def repaired() -> bool:
        current, _ = await world.admin.control.policy_entry()
        return current is not None and current.revision == rev

    end = time.monotonic() + 10
    while not await repaired():
        assert time.monotonic() < end, "the registry did not put the genuine revision back"
        await asyncio.sleep(0.1)
    assert bob.governance.revision == rev
    assert bob.governance.error is None  # not a NACK: nobody asked bob to run the forgery
    records, _ = await world.admin.control.read_audit()
    assert any(r.kind == "store.repaired" for r in records)


async def test_only_admins_may_apply(world: World) -> None:
    """The registry refuses control-plane changes from an identity without the admin role."""
    eve = await world.join("eve")
    await eve.wait_for("registry")
    with pytest.raises(mesh.PermissionDenied) as info:
        await eve.request("registry", "apply", ApplyRequest(policy=POLICY), ApplyReply)
    assert info.value.rule == "registry: admin role required"


async def test_invalid_policy_is_refused_with_location(world: World) -> None:
    """Applying a broken policy fails with the file, line and problem."""
    with pytest.raises(mesh.InvalidArgument) as info:
        await world.apply(
            "apiVersion: mesh/v1\nkind: Policy\nmetadata: {name: x}\nspec:\n  nope: 1\n",
            source="bad.yaml",
        )
    assert "bad.yaml:5" in info.value.message


async def test_rate_limited_caller_gets_retry_after_while_others_pass(world: World) -> None:
    """Over its per-caller limit a caller gets RESOURCE_EXHAUSTED with a retry-after; a second
    caller under its own limit is unaffected."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    # Retries would wait out the limit; show the error instead.
    alice = await world.join(
        "alice", config=dataclasses.replace(world.cfg, retry=mesh.RetryPolicy(attempts=1))
    )
    carol = await world.join("carol", roles=["ops"])
    rev = await world.apply(POLICY)
    for m in (bob, alice, carol):
        await wait_until(lambda m=m: m.governance.revision == rev)
    no_retry = dict(timeout=5)
    for _ in range(5):
        await alice.request("bob", "echo", Msg(text="a"), Msg, **no_retry)
    with pytest.raises(mesh.ResourceExhausted) as info:
        await alice.request("bob", "echo", Msg(text="a"), Msg, **no_retry)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 0.25
    assert (await carol.request("bob", "echo", Msg(text="c"), Msg)).text == "c"
    assert calls["alice"] == 5 and calls["carol"] == 1


async def test_rate_limited_retry_honours_retry_after(world: World) -> None:
    """An idempotent call over the limit is retried after the retry-after, and succeeds."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    alice = await world.join("alice")
    rev = await world.apply(POLICY)
    for m in (bob, alice):
        await wait_until(lambda m=m: m.governance.revision == rev)
    results = await asyncio.gather(
        *(alice.request("bob", "echo", Msg(text=str(i)), Msg, timeout=5) for i in range(7))
    )
    assert len(results) == 7
    assert alice.stats.fates["ok_after_retry"] >= 2


async def test_enrolment_with_token_then_refusals(world: World, tmp_path: Path) -> None:
    """A join token enrols once; a used, expired or forged token is refused."""
    token = await world.admin.request(
        "registry", "token", TokenRequest(agent="worker", roles=["batch"]), TokenReply
    )
    root_pk = world.root.public_key
    ident = await mesh.enrol(world.cfg, agent="worker", token=token.token, root_public_key=root_pk)
    assert ident.certificate.roles == ("batch",)
    assert CertificateVerifier(root_pk).verify(ident.certificate.raw)
    with pytest.raises(mesh.Unauthenticated, match="already used"):
        await mesh.enrol(world.cfg, agent="worker", token=token.token, root_public_key=root_pk)
    with pytest.raises(mesh.Unauthenticated, match="unknown join token"):
        await mesh.enrol(world.cfg, agent="worker", token="mjt_forged", root_public_key=root_pk)
    short = await world.admin.request(
        "registry", "token", TokenRequest(agent="worker", ttl=0.2), TokenReply
    )
    await asyncio.sleep(0.3)
    with pytest.raises(mesh.Unauthenticated, match="expired"):
        await mesh.enrol(world.cfg, agent="worker", token=short.token, root_public_key=root_pk)
    other = await world.admin.request("registry", "token", TokenRequest(agent="worker"), TokenReply)
    with pytest.raises(mesh.Unauthenticated, match="another agent"):
        await mesh.enrol(world.cfg, agent="spy", token=other.token, root_public_key=root_pk)
    # The enrolled identity works in the mesh.
    async with mesh.Mesh(ident, world.cfg) as worker:
        await worker.wait_for("registry")


async def test_renewal_under_load_drops_no_request(world: World) -> None:
    """Renewing a certificate while calls flow in both directions fails none of them."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    alice = await world.join("alice")
    await alice.wait_for("bob")
    before = (alice.identity.certificate.serial, bob.identity.certificate.serial)
    stop = asyncio.Event()

    async def load() -> int:
        n = 0
        while not stop.is_set():
            await alice.request("bob", "echo", Msg(text="x"), Msg)
            n += 1
        return n

    workers = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.2)
    await alice.governance.renew_now()
    await bob.governance.renew_now()
    await asyncio.sleep(0.3)
    stop.set()
    done = await asyncio.gather(*workers)
    assert sum(done) > 0
    after = (alice.identity.certificate.serial, bob.identity.certificate.serial)
    assert before[0] != after[0] and before[1] != after[1]
    assert alice.stats.fates.get("failed", 0) == 0
    listed = await world.admin.request("registry", "identities", Empty(), IdentityList)
    assert {i.via for i in listed.identities if i.serial in after} == {"renewal"}


async def test_revocation_takes_effect_within_seconds(world: World) -> None:
    """After `revoke AGENT`, every agent refuses the revoked certificates."""
    calls: Counter[str] = Counter()
    await world.join("bob", make_bob(calls))
    token = await world.admin.request("registry", "token", TokenRequest(agent="alice"), TokenReply)
    ident = await mesh.enrol(
        world.cfg, agent="alice", token=token.token, root_public_key=world.root.public_key
    )
    alice = await world.stack.enter_async_context(mesh.Mesh(ident, world.cfg))
    await alice.wait_for("bob")
    await alice.request("bob", "echo", Msg(text="before"), Msg)
    reply = await world.admin.request(
        "registry", "revoke", RevokeRequest(target="alice"), RevokeReply
    )
    assert ident.certificate.serial in reply.revoked
    started = time.monotonic()
    # bob's refusal is unsealed (alice's certificate no longer verifies), so alice keeps
    # waiting for a sealed reply and quotes the refusal when her deadline passes.
    with pytest.raises(mesh.DeadlineExceeded, match=r"UNAUTHENTICATED: .*revoked"):
        while True:
            await alice.request("bob", "echo", Msg(text="after"), Msg, timeout=1)
            await asyncio.sleep(0.05)
    assert time.monotonic() - started < 6


async def test_registry_restart_loses_nothing_and_agents_fail_static(world: World) -> None:
    """With the registry down agents keep enforcing the last policy; a new registry instance
    finds every revision, token and audit record."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    alice = await world.join("alice")
    mallory = await world.join("mallory")
    rev = await world.apply(POLICY)
    token = await world.admin.request("registry", "token", TokenRequest(agent="late"), TokenReply)
    await wait_until(lambda: bob.governance.revision == rev)
    records_before, _ = await world.admin.control.read_audit()

    await world.registry.drain()
    await wait_until(lambda: not world.admin.directory.instances("registry"))
    assert (await alice.request("bob", "echo", Msg(text="still"), Msg)).text == "still"
    mallory.governance.engine = PolicyEngine(None)
    with pytest.raises(mesh.PermissionDenied):
        await mallory.request("bob", "echo", Msg(text="x"), Msg)

    world.registry = await world.start_registry()
    info = await world.admin.request("registry", "get", Empty(), RevisionInfo)
    assert info.revision == rev
    ident = await mesh.enrol(
        world.cfg, agent="late", token=token.token, root_public_key=world.root.public_key
    )
    assert ident.certificate.agent == "late"
    records_after, problems = await world.admin.control.read_audit()
    assert problems == []
    assert [r.kind for r in records_after[: len(records_before)]] == [
        r.kind for r in records_before
    ]
    assert {"policy.applied", "identity.token_created", "identity.issued"} <= {
        r.kind for r in records_after
    }


async def test_two_registries_serve_at_once(world: World) -> None:
    """A second registry instance shares the state: either may answer, revisions stay linear."""
    second = await world.start_registry()
    try:
        await wait_until(lambda: len(world.admin.directory.instances("registry")) == 2)
        revs = [await world.apply(POLICY.replace("test", f"test-{i}")) for i in range(4)]
        assert revs == sorted(revs) and len(set(revs)) == 4
        _, problems = await world.admin.control.read_audit()
        assert problems == []
    finally:
        await second.drain()


async def test_rollback_applies_an_old_revision_again(world: World) -> None:
    """Rollback makes a new revision with the old content, and agents follow."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    first = await world.apply(POLICY)
    second = await world.apply((POLICIES / "open.yaml").read_text(), source="open.yaml")
    reply = await world.admin.request(
        "registry", "rollback", RollbackRequest(revision=first), ApplyReply
    )
    assert reply.revision == second + 1
    await wait_until(lambda: bob.governance.revision == reply.revision)
    history = await world.admin.request("registry", "history", Empty(), HistoryReply)
    assert [h.revision for h in history.revisions] == [first, second, reply.revision]
    assert history.revisions[-1].rollback_of == first
    assert history.revisions[-1].sha256 == history.revisions[0].sha256


async def test_audit_log_records_and_detects_tampering(world: World) -> None:
    """Denials and changes are audited; a forged record or a removed one is detected."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    mallory = await world.join("mallory")
    rev = await world.apply(POLICY)
    await wait_until(lambda: bob.governance.revision == rev)
    mallory.governance.engine = PolicyEngine(None)
    with pytest.raises(mesh.PermissionDenied):
        await mallory.request("bob", "echo", Msg(text="x"), Msg)

    async def kinds() -> set[str]:
        records, _ = await world.admin.control.read_audit()
        return {r.kind for r in records}

    end = time.monotonic() + 5
    while "authz.denied" not in await kinds() and time.monotonic() < end:
        await asyncio.sleep(0.05)
    records, problems = await world.admin.control.read_audit()
    assert problems == []
    denial = next(r for r in records if r.kind == "authz.denied")
    assert denial.subject == "mallory -> bob.echo" and denial.details["rule"] == "default deny"

    nc = await nats.connect(world.server.url)
    try:
        js = nc.jetstream()
        forger = TrustRoot.generate()
        fake = AuditRecord(kind="policy.applied", actor="admin/x", subject="revision 99")
        body = asdict(fake)
        body.pop("seq")
        await js.publish("mesh.audit", sign_document(forger, body))
        await js.delete_msg("mesh-audit", records[1].seq)
    finally:
        await nc.close()
    _, problems = await world.admin.control.read_audit()
    text = "\n".join(problems)
    assert "missing (removed)" in text
    assert "not signed by this mesh's trust root" in text


async def test_agents_keep_serving_while_jetstream_is_away_and_catch_up(world: World) -> None:
    """The NATS server (and JetStream) restarts: agents serve on the last good policy meanwhile,
    re-create their watches after reconnecting, and pick up the next revision."""
    calls: Counter[str] = Counter()
    bob = await world.join("bob", make_bob(calls))
    alice = await world.join("alice")
    rev = await world.apply(POLICY)
    await wait_until(lambda: bob.governance.revision == rev and alice.governance.revision == rev)
    await world.registry.drain()

    await world.server.kill()
    with pytest.raises(mesh.MeshError):  # the broker is gone: the call fails, nothing hangs
        await alice.request("bob", "echo", Msg(text="x"), Msg, timeout=0.5)
    assert bob.governance.revision == rev  # fail static: the last good policy stays
    await world.server.restart()

    await wait_until(lambda: alice.transport.connected and bob.transport.connected, timeout=20)
    await alice.wait_for("bob", timeout=20)
    assert (await alice.request("bob", "echo", Msg(text="back"), Msg, timeout=5)).text == "back"
    world.registry = await world.start_registry()
    newer = await world.apply(POLICY.replace("name: test", "name: test-after-restart"))
    await wait_until(
        lambda: bob.governance.revision == newer and alice.governance.revision == newer,
        timeout=20,
    )
