"""Enrolment and renewal against an attacker on the broker: forged replies never end an
enrolment, a lost reply costs no token, junk cannot starve a legitimate enrolment, and a
certified insider cannot renew in a loop.

Every attacker is a plain nats-py client (or an agent with a real certificate and no roles)
against a real nats-server and a real registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import msgpack
import nats
import pytest
from nacl.public import PublicKey, SealedBox
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import mesh
from mesh import InstanceKeys
from mesh._runtime.enrol import _sealed_request
from mesh.control_plane import (
    AuditRecord,
    CertificateReply,
    RenewRequest,
    TokenReply,
    TokenRequest,
    TrustRoot,
)
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration

ENROL = "mesh.ctl.registry.{}.enrol"


@dataclass
class World:
    url: str
    root: TrustRoot
    cfg: mesh.MeshConfig
    stack: AsyncExitStack
    admin: mesh.Mesh
    registry: mesh.Mesh

    async def token(self, agent: str) -> str:
        reply = await self.admin.request("registry", "token", TokenRequest(agent=agent), TokenReply)
        return reply.token

    async def enrol(
        self, agent: str, token: str, keys: InstanceKeys | None = None, timeout: float = 10.0
    ) -> mesh.Identity:
        return await mesh.enrol(
            self.cfg,
            agent=agent,
            token=token,
            root_public_key=self.root.public_key,
            keys=keys,
            timeout=timeout,
        )

    async def audit(self) -> list[AuditRecord]:
        records, problems = await self.admin.control.read_audit()
        assert problems == []
        return records

    def sealed(self, agent: str, token: str, keys: InstanceKeys) -> bytes:
        """An enrolment request for the registry instance, as the agent makes it."""
        box = SealedBox(PublicKey(self.registry.identity.certificate.box_pk))
        return box.encrypt(msgpack.packb(_sealed_request(agent, token, keys), use_bin_type=True))


@pytest.fixture
async def world(nats_server: NatsServer) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), cfg)
        )
        registry = await stack.enter_async_context(
            mesh.Mesh(
                root.issue_identity("registry", roles=["registry"]),
                cfg,
                agent=reg.registry,
                trust_root=root,
            )
        )
        await admin.wait_for("registry")
        yield World(nats_server.url, root, cfg, stack, admin, registry)


@pytest.fixture
async def attacker(world: World) -> AsyncIterator[NATS]:
    nc = await nats.connect(world.url)
    yield nc
    await nc.close()


def kinds(records: list[AuditRecord], kind: str, subject: str) -> list[AuditRecord]:
    return [r for r in records if r.kind == kind and r.subject == subject]


async def test_forged_error_replies_never_end_an_enrolment(world: World, attacker: NATS) -> None:
    """An attacker answering every enrolment request first (a plain "already used" map, a
    badly signed one, a "no responders" status) and replaying the request changes nothing:
    the enrolment succeeds, the token is used once, one identity.issued is audited."""
    forged = 0
    seen: set[bytes] = set()

    async def forge(msg: Msg) -> None:
        nonlocal forged
        if not msg.reply or msg.data in seen:
            return  # (not its own replays)
        seen.add(msg.data)
        plain = {"status": "UNAUTHENTICATED", "message": "join token was already used"}
        badly_signed = {
            **plain,
            "certificate": b"",
            "request": hashlib.sha256(msg.data).digest(),
            "sig": os.urandom(64),
        }
        await attacker.publish(msg.reply, msgpack.packb(plain))
        await attacker.publish(msg.reply, msgpack.packb(badly_signed, use_bin_type=True))
        await attacker.publish(msg.reply, b"", headers={"Status": "503"})
        for _ in range(3):  # the request itself, replayed with the attacker's inbox
            await attacker.publish(msg.subject, msg.data, reply=attacker.new_inbox())
        forged += 1

    await attacker.subscribe(ENROL.format("*"), cb=forge)
    await attacker.flush()
    token = await world.token("worker")
    ident = await world.enrol("worker", token, timeout=10)
    assert forged >= 1
    assert ident.certificate.agent == "worker"

    grant = await world.registry.control.peek_token(
        token, sign_pk=ident.keys.sign_pk, box_pk=ident.keys.box_pk
    )
    assert grant.used_by_serial == ident.certificate.serial
    records = await world.audit()
    assert len(kinds(records, "identity.issued", "worker")) == 1
    assert kinds(records, "identity.enrolment_refused", "worker") == []
    certs = [c for c in await world.registry.control.certificates() if c.agent == "worker"]
    assert [c.serial for c in certs] == [ident.certificate.serial]


async def test_a_retry_after_a_lost_reply_gets_the_same_certificate(
    world: World, attacker: NATS
) -> None:
    """The registry redeems a token but its reply is lost: the same keys get the same
    certificate again; other keys get "already used"; one identity.issued in all."""
    token = await world.token("worker")
    keys = InstanceKeys.generate()
    # A request reaches the registry; its reply goes to an inbox nobody reads. (It is sent
    # again until it is served, as a client would: a token younger than the registry's token
    # index is only found at the index's next refresh, at most a second later.)
    sealed = world.sealed("worker", token, keys)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        await attacker.publish(
            ENROL.format(world.registry.instance), sealed, reply=attacker.new_inbox()
        )
        await attacker.flush()
        await asyncio.sleep(0.3)
        if kinds(await world.audit(), "identity.issued", "worker"):
            break
    first = [c for c in await world.registry.control.certificates() if c.agent == "worker"]
    assert len(first) == 1

    again = await world.enrol("worker", token, keys=keys, timeout=10)
    assert again.certificate.raw == first[0].certificate
    with pytest.raises(mesh.Unauthenticated, match="already used"):
        await world.enrol("worker", token, timeout=10)

    records = await world.audit()
    assert len(kinds(records, "identity.issued", "worker")) == 1
    assert len(kinds(records, "identity.enrolment_refused", "worker")) == 1  # the other keys
    certs = [c for c in await world.registry.control.certificates() if c.agent == "worker"]
    assert [c.serial for c in certs] == [again.certificate.serial]


async def test_junk_enrolments_do_not_starve_a_legitimate_one(world: World, attacker: NATS) -> None:
    """About 100 junk enrolments a second (sealed with a valid proof and random tokens, and
    undecryptable bytes) while an agent enrols: it succeeds well within its timeout, and the
    junk writes nothing to the audit log."""
    subject = ENROL.format(world.registry.instance)
    junk_keys = InstanceKeys.generate()
    answers: Counter[str] = Counter()
    sent: Counter[str] = Counter()

    async def on_answer(msg: Msg) -> None:
        answers[msgpack.unpackb(msg.data, raw=False).get("message", "")] += 1

    inbox = attacker.new_inbox()
    await attacker.subscribe(inbox, cb=on_answer)
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            token = "mjt_" + secrets.token_urlsafe(32)
            await attacker.publish(subject, world.sealed("junk", token, junk_keys), reply=inbox)
            size = secrets.randbelow(1000) + 49
            await attacker.publish(subject, os.urandom(size), reply=inbox)
            sent["junk"] += 2
            await asyncio.sleep(0.02)  # two every 20 ms: 100 a second

    token = await world.token("worker")
    task = asyncio.create_task(flood())
    try:
        await asyncio.sleep(1.0)  # the flood is under way
        started = time.monotonic()
        ident = await world.enrol("worker", token, timeout=15)
        took = time.monotonic() - started
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await task
    assert ident.certificate.agent == "worker"
    assert took < 5.0, f"enrolment took {took:.1f}s under the flood"
    assert sent["junk"] >= 100
    # Random tokens are refused (signed) at most once per index re-read; junk gets nothing.
    assert set(answers) <= {"unknown join token"}
    assert answers["unknown join token"] <= took + 4
    records = await world.audit()
    assert [r for r in records if r.kind == "identity.enrolment_refused"] == []
    assert len(kinds(records, "identity.issued", "worker")) == 1


async def test_an_insider_cannot_renew_in_a_loop(world: World) -> None:
    """A certified agent without roles renewing 200 times in a row: the first few succeed,
    the rest are RESOURCE_EXHAUSTED with a retry-after; certificates and audit records stay
    bounded, and another agent still renews."""
    insider = await world.stack.enter_async_context(
        mesh.Mesh(world.root.issue_identity("insider"), world.cfg)
    )
    await insider.wait_for("registry")
    ok, refused = 0, []
    started = time.monotonic()
    for _ in range(10):
        results = await asyncio.gather(
            *(
                insider.request("registry", "renew", RenewRequest(), CertificateReply, timeout=5)
                for _ in range(20)
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, CertificateReply):
                ok += 1
            else:
                assert isinstance(r, mesh.ResourceExhausted), repr(r)
                refused.append(r)
    took = time.monotonic() - started
    assert ok == reg.RENEW_BURST
    assert len(refused) == 200 - ok
    assert all(e.retry_after is not None and e.retry_after > 0 for e in refused)
    assert took < 20

    records = await world.audit()
    assert len(kinds(records, "identity.renewed", "insider")) == ok
    certs = [c for c in await world.registry.control.certificates() if c.agent == "insider"]
    assert len(certs) == ok
    # The limit is per identity: another agent is not affected.
    other = await world.stack.enter_async_context(
        mesh.Mesh(world.root.issue_identity("other"), world.cfg)
    )
    await other.wait_for("registry")
    await other.request("registry", "renew", RenewRequest(), CertificateReply, timeout=5)


def test_renewal_limiter_refills_one_per_interval() -> None:
    """Three at once, then one per interval; each identity has its own bucket; the least
    recently used bucket goes first when the table is full."""
    now = [0.0]
    limiter = reg.RenewalLimiter(burst=3, interval=60.0, max_buckets=2, clock=lambda: now[0])
    assert [limiter.take(("a", "1")) for _ in range(3)] == [None, None, None]
    assert limiter.take(("a", "1")) == pytest.approx(60.0)
    assert limiter.take(("b", "1")) is None
    now[0] = 30.0
    assert limiter.take(("a", "1")) == pytest.approx(30.0)
    now[0] = 60.0
    assert limiter.take(("a", "1")) is None
    assert limiter.take(("a", "1")) is not None
    limiter.take(("c", "1"))  # evicts ("b", "1"), the least recently used
    assert limiter.take(("a", "1")) is not None
