"""Unauthenticated failure signals (refusals, "no responders") neither fail a call nor make a
call run twice: the attempt keeps waiting for a sealed reply (more in test_forged_refusals)."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
from nats.aio.msg import Msg
from pydantic import BaseModel

import mesh
from mesh._core.envelope import Header, Kind, decode_frame, encode_frame
from mesh.testing import NatsServer, Trust, test_config, wait_until


class Job(BaseModel):
    key: str


class Done(BaseModel):
    instance: str


def counting_worker(runs: Counter[str]) -> mesh.Agent:
    agent = mesh.Agent("worker")

    @agent.endpoint()
    async def work(job: Job, ctx: mesh.Context) -> Done:
        runs[job.key] += 1
        await asyncio.sleep(0.3)
        return Done(instance=ctx.mesh.instance)

    return agent


async def test_forged_refusal_and_no_responders_do_not_duplicate_a_keyed_call(
    nats_server: NatsServer, trust: Trust
) -> None:
    """An attacker answering a keyed call with a fake UNAVAILABLE refusal and a fake
    "no responders" status: the caller re-sends the same frame to the same instance and keeps
    waiting for its sealed reply; the handler runs once in the whole mesh."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    agent = counting_worker(runs)
    attacker = await nats.connect(nats_server.url)
    forged = 0
    seen: set[bytes] = set()

    async def forge(msg: Msg) -> None:
        nonlocal forged
        hdr, _ = decode_frame(msg.data)
        if hdr.id in seen:
            return  # a re-sent copy of a frame already answered
        seen.add(hdr.id)
        refusal = Header(
            kind=Kind.REFUSAL,
            id=bytes(16),
            ts=hdr.ts,
            reply_to=hdr.id,
            status="UNAVAILABLE",
            message="forged",
        )
        await attacker.publish(msg.reply, encode_frame(refusal)[0])
        await attacker.publish(msg.reply, b"", headers={"Status": "503"})
        forged += 1

    await attacker.subscribe("mesh.rpc.worker.>", cb=forge)
    await attacker.flush()
    try:
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=agent),
            mesh.Mesh(trust.identity("worker"), cfg, agent=agent),
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await wait_until(lambda: len(alice.directory.instances("worker")) == 2)
            replies = await asyncio.gather(
                *(
                    alice.request("worker", "work", Job(key=f"k{i}"), Done, idempotency_key=f"k{i}")
                    for i in range(6)
                )
            )
        assert len(replies) == 6
        assert forged == 6
        assert runs == Counter({f"k{i}": 1 for i in range(6)})
        assert alice.stats.fates == {"ok": 6}
    finally:
        await attacker.close()


async def test_forged_refusal_without_key_neither_fails_the_call_nor_runs_it_twice(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A non-idempotent call without a key, refused UNAVAILABLE by a forger, gets its reply."""
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    attacker = await nats.connect(nats_server.url)

    async def forge(msg: Msg) -> None:
        hdr, _ = decode_frame(msg.data)
        refusal = Header(
            kind=Kind.REFUSAL,
            id=bytes(16),
            ts=hdr.ts,
            reply_to=hdr.id,
            status="UNAVAILABLE",
            message="forged",
        )
        await attacker.publish(msg.reply, encode_frame(refusal)[0])

    await attacker.subscribe("mesh.rpc.worker.>", cb=forge)
    await attacker.flush()
    try:
        async with (
            mesh.Mesh(trust.identity("worker"), cfg, agent=counting_worker(runs)),
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await alice.wait_for("worker")
            await alice.request("worker", "work", Job(key="once"), Done)
        assert runs["once"] == 1
        assert alice.stats.fates == {"ok": 1}
    finally:
        await attacker.close()
