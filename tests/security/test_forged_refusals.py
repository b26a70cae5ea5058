"""Only sealed refusals end an attempt early (protocol §12, §13): forged REFUSAL frames and
forged "no responders" statuses neither fail a call nor run its handler twice, and genuine
refusals of an authenticated caller still arrive at once, sealed, with their rule and
retry-after.

The attacker is a plain nats-py client subscribed to the worker's request subjects: it sees
every request (and its id and reply subject) and answers on the caller's inbox first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

import mesh
from mesh._core.envelope import Header, Kind, decode_frame, encode_frame
from mesh.control_plane import PolicyEngine
from mesh.testing import NatsServer, Trust, test_config, wait_until

pytestmark = pytest.mark.integration

WORK = 0.3  # the handler's run time: the forgery always reaches the caller first

DENY_ALICE = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: refusals}
spec:
  rules:
    - name: alice-out
      deny: {callers: [alice], agent: worker}
"""

RATE_LIMITED = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: refusals}
spec:
  rules:
    - name: alice-ok
      allow: {callers: [alice], agent: worker}
  endpoints:
    worker.work:
      rate_limit: {per_caller: 1/s, burst: 1}
"""


class Job(BaseModel):
    key: str


class Done(BaseModel):
    instance: str


def worker(runs: Counter[str], *, idempotent: bool = False, seconds: float = WORK) -> mesh.Agent:
    """``worker.work``, counting its runs by job key across every instance built from it."""
    agent = mesh.Agent("worker")

    @agent.endpoint(idempotent=idempotent)
    async def work(job: Job, ctx: mesh.Context) -> Done:
        runs[job.key] += 1
        await asyncio.sleep(seconds)
        return Done(instance=ctx.mesh.instance)

    return agent


@pytest_asyncio.fixture
async def attacker(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


Forge = Callable[[Msg, Header], Awaitable[None]]


async def forge_on_requests(attacker: NatsClient, forge: Forge) -> None:
    """Call ``forge`` for every request frame sent to any worker instance."""

    async def on_request(msg: Msg) -> None:
        hdr, _ = decode_frame(msg.data)
        if hdr.kind == Kind.REQUEST and msg.reply:
            await forge(msg, hdr)

    await attacker.subscribe("mesh.rpc.worker.>", cb=on_request)
    await attacker.flush()


def refusal(hdr: Header, code: str, message: str, **extra: object) -> bytes:
    """An unsealed REFUSAL as a callee writes it, answering ``hdr``."""
    header = Header(
        kind=Kind.REFUSAL,
        id=bytes(16),
        ts=int(time.time() * 1000),
        reply_to=hdr.id,
        status=code,
        message=message,
        **extra,  # type: ignore[arg-type]
    )
    return encode_frame(header)[0]


async def test_forged_permission_denied_yields_the_real_reply(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A forged PERMISSION_DENIED refusal does not fail the call: the caller gets the handler's
    reply, and the handler ran once."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])

    async def deny(msg: Msg, hdr: Header) -> None:
        frame = refusal(hdr, "PERMISSION_DENIED", "forged", rule="attacker")
        await attacker.publish(msg.reply, frame)

    await forge_on_requests(attacker, deny)
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=worker(runs)) as w,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("worker")
        reply = await alice.request("worker", "work", Job(key="once"), Done)
        assert reply.instance == w.instance
        assert alice.stats.refusal_hints == 1
    assert runs == Counter(once=1)
    assert alice.stats.fates == {"ok": 1}


async def test_forged_unavailable_on_every_attempt_runs_an_idempotent_call_once(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """Forged UNAVAILABLE refusals of every request of an idempotent call, with two instances
    to fail over to, do not move it: the handler runs exactly once in the whole mesh."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    forged = 0

    async def unavailable(msg: Msg, hdr: Header) -> None:
        nonlocal forged
        forged += 1
        await attacker.publish(msg.reply, refusal(hdr, "UNAVAILABLE", "forged"))

    await forge_on_requests(attacker, unavailable)
    agent = worker(runs, idempotent=True)
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=agent),
        mesh.Mesh(trust.identity("worker"), cfg, agent=agent),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await wait_until(lambda: len(alice.directory.instances("worker")) == 2)
        replies = await asyncio.gather(
            *(alice.request("worker", "work", Job(key=f"k{i}"), Done) for i in range(6))
        )
    assert len(replies) == 6
    assert forged == 6
    assert runs == Counter({f"k{i}": 1 for i in range(6)})
    assert alice.stats.fates == {"ok": 6}


@pytest.mark.parametrize(
    ("idempotent", "keyed"), [(False, False), (False, True), (True, False)], ids=str
)
async def test_forged_no_responders_neither_fails_nor_duplicates_a_call(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient, idempotent: bool, keyed: bool
) -> None:
    """A forged "no responders" answer to every frame sent (the re-sends too) does not fail
    the call early and does not run it twice, whatever its kind: the caller re-sends the same
    frame to the same instance, whose seen-cache refuses the copy, and gets the real reply."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    forged = 0

    async def no_responders(msg: Msg, hdr: Header) -> None:
        nonlocal forged
        forged += 1
        await attacker.publish(msg.reply, b"", headers={"Status": "503"})

    await forge_on_requests(attacker, no_responders)
    agent = worker(runs, idempotent=idempotent)
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=agent) as w1,
        mesh.Mesh(trust.identity("worker"), cfg, agent=agent) as w2,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await wait_until(lambda: len(alice.directory.instances("worker")) == 2)
        started = time.monotonic()
        reply = await alice.request(
            "worker", "work", Job(key="once"), Done, idempotency_key="once" if keyed else None
        )
        elapsed = time.monotonic() - started
        assert reply.instance in (w1.instance, w2.instance)
        assert alice.stats.no_responders >= 1
        assert len(alice.directory.instances("worker")) == 2, "no instance was ejected"
    assert forged >= 2, "the frame was sent again after the forged status"
    assert runs == Counter(once=1)
    assert alice.stats.fates == {"ok": 1}
    assert elapsed < WORK + 1.0


async def test_genuine_no_responders_fails_over_once_the_directory_says_gone(
    nats_server: NatsServer, trust: Trust
) -> None:
    """An instance whose process is gone (connection closed, its record still signed as
    serving) answers "no responders": the caller re-sends until the directory has had no
    heartbeat of it for ``ttl``, then the keyed call moves and runs once, on the survivor."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    agent = worker(runs, seconds=0.0)
    dead = mesh.Mesh(trust.identity("worker"), cfg, agent=agent)
    await dead.__aenter__()
    try:
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=agent) as survivor,
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await wait_until(lambda: len(alice.directory.instances("worker")) == 2)
            alice.client.picker.penalize(f"worker.{survivor.instance}", 60.0)  # pick the dead
            await dead.transport.nc.close()
            started = time.monotonic()
            reply = await alice.request(
                "worker", "work", Job(key="moved"), Done, idempotency_key="moved"
            )
            elapsed = time.monotonic() - started
            assert reply.instance == survivor.instance
            assert alice.stats.no_responders >= 2
            assert alice.stats.fates == {"ok_after_retry": 1}
    finally:
        with contextlib.suppress(Exception):
            await dead.__aexit__(None, None, None)
    assert runs == Counter(moved=1)
    assert elapsed < cfg.directory.ttl + 1.0


async def test_genuine_policy_denial_arrives_sealed_and_at_once(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A policy denial is a sealed REPLY: the caller fails at once with the deciding rule."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=worker(runs)) as w,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        w.governance.engine = PolicyEngine(mesh.parse_policy(DENY_ALICE), revision=1)
        await alice.wait_for("worker")
        inbox = await attacker.subscribe("_INBOX.>")
        started = time.monotonic()
        with pytest.raises(mesh.PermissionDenied) as info:
            await alice.request("worker", "work", Job(key="denied"), Done)
        assert time.monotonic() - started < 1.0
        answer = await next_frame(inbox)
    assert info.value.rule == "alice-out"
    assert answer.kind == Kind.REPLY
    assert answer.status == "PERMISSION_DENIED"
    assert runs == Counter()


async def test_rate_limit_peek_refusal_arrives_sealed_with_retry_after(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A request refused by the rate-limit peek (before the seal is opened) is answered with a
    sealed REPLY: the caller fails at once with RESOURCE_EXHAUSTED and its retry-after."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=worker(runs, seconds=0.0)) as w,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        w.governance.engine = PolicyEngine(mesh.parse_policy(RATE_LIMITED), revision=1)
        await alice.wait_for("worker")
        await alice.request("worker", "work", Job(key="first"), Done)
        inbox = await attacker.subscribe("_INBOX.>")
        started = time.monotonic()
        with pytest.raises(mesh.ResourceExhausted) as info:
            await alice.request("worker", "work", Job(key="second"), Done)
        assert time.monotonic() - started < 1.0
        answer = await next_frame(inbox)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 1.0
    assert answer.kind == Kind.REPLY
    assert answer.status == "RESOURCE_EXHAUSTED"
    assert runs == Counter(first=1)
    assert w.stats.refused == {"RESOURCE_EXHAUSTED": 1}


async def test_unsealed_refusal_is_quoted_when_the_call_times_out(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """With no sealed reply before the deadline, the caller's DEADLINE_EXCEEDED quotes the
    unauthenticated refusal it received, and comes at the deadline, not before."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])

    async def expired(msg: Msg, hdr: Header) -> None:
        frame = refusal(hdr, "UNAUTHENTICATED", "certificate expired")
        await attacker.publish(msg.reply, frame)

    await forge_on_requests(attacker, expired)
    async with (
        mesh.Mesh(trust.identity("worker"), cfg, agent=worker(runs, seconds=4.0)),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("worker")
        started = time.monotonic()
        # (1.5 s: room for the forgery to arrive first on a loaded machine)
        with pytest.raises(
            mesh.DeadlineExceeded,
            match=r"unauthenticated refusal received: UNAUTHENTICATED: certificate expired",
        ):
            await alice.request("worker", "work", Job(key="slow"), Done, timeout=1.5)
        assert time.monotonic() - started >= 1.45


async def next_frame(sub: Subscription) -> Header:
    """The next mesh frame on ``sub`` (an inbox tap also sees other traffic)."""
    while True:
        msg = await sub.next_msg(timeout=5.0)
        try:
            return decode_frame(msg.data)[0]
        except mesh.DecodeError:
            continue
