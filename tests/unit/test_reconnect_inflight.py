"""Attempts in flight when the caller's connection drops: failed fast and retried when that is
safe, the same frame sent again otherwise (MemoryTransport acts the reconnect out)."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

import mesh
from mesh import Agent, DirectoryConfig, Mesh
from mesh.testing import MemoryTransport, Trust, test_config, wait_until


class Job(BaseModel):
    n: int


def _config() -> mesh.MeshConfig:
    return test_config(
        ["mem://"], directory=DirectoryConfig(heartbeat=0.25, ttl=1.5, drain_grace=0.0)
    )


def _worker(runs: list[int], release: asyncio.Event) -> Agent:
    agent = Agent("worker")

    async def hold(job: Job) -> Job:
        runs.append(job.n)
        if len(runs) == 1:
            await release.wait()  # the first run waits; a reply for it may be "lost"
        return job

    agent.endpoint(name="idem", idempotent=True)(hold)
    agent.endpoint(name="plain")(hold)
    return agent


async def _call_across_reconnect(
    trust: Trust, endpoint: str, key: str | None
) -> tuple[list[int], Mesh, dict[str, int]]:
    broker = MemoryTransport.new_broker()
    runs: list[int] = []
    release = asyncio.Event()
    caller = MemoryTransport(broker)
    async with (
        Mesh(
            trust.identity("worker"),
            _config(),
            agent=_worker(runs, release),
            transport=MemoryTransport(broker),
        ) as worker,
        Mesh(trust.identity("alice"), _config(), transport=caller) as alice,
    ):
        await alice.wait_for("worker")
        call = asyncio.create_task(
            alice.request("worker", endpoint, Job(n=1), Job, timeout=5, idempotency_key=key)
        )
        await wait_until(lambda: len(runs) == 1)
        await caller.reconnect()
        await asyncio.sleep(0.1)
        release.set()
        assert (await call).n == 1
        return runs, alice, dict(worker.stats.refused)


async def test_an_idempotent_call_in_flight_is_retried_after_a_reconnect(trust: Trust) -> None:
    """The attempt waiting when the connection dropped fails at once and a fresh one is made
    (its reply may have been lost): the handler runs again and answers."""
    runs, alice, _ = await _call_across_reconnect(trust, "idem", None)
    assert len(runs) == 2
    assert alice.stats.fates.get("ok_after_retry") == 1


async def test_a_keyed_call_in_flight_is_retried_and_deduplicated(trust: Trust) -> None:
    """A keyed call makes a fresh attempt to the same instance, whose reply cache holds it
    until the first run answers: the handler runs once."""
    runs, alice, _ = await _call_across_reconnect(trust, "plain", "k1")
    assert runs == [1]
    assert alice.stats.fates.get("ok_after_retry") == 1


async def test_an_unkeyed_call_in_flight_sends_the_same_frame_again(trust: Trust) -> None:
    """A call that may not be retried sends its frame again (the callee drops the copy), is
    answered by its one run, and counts no retry."""
    runs, alice, refused = await _call_across_reconnect(trust, "plain", None)
    assert runs == [1]
    assert alice.stats.fates.get("ok") == 1 and "ok_after_retry" not in alice.stats.fates
    assert sum(refused.values()) == 1, refused  # the copy, refused by the seen-cache


async def test_fresh_signed_evidence_lifts_a_no_responders_penalty(trust: Trust) -> None:
    """A penalty set on "no responders" stays for evidence signed before it, and is lifted by
    a record or beat signed after it."""
    broker = MemoryTransport.new_broker()
    async with Mesh(trust.identity("alice"), _config(), transport=MemoryTransport(broker)) as a:
        client = a.client
        client._suspect("worker.x")
        assert client.picker._load("worker.x", time.monotonic()) >= 1000
        client.heard("worker.x", time.time() - 1.0)
        assert client.picker._load("worker.x", time.monotonic()) >= 1000
        client.heard("worker.x", time.time() + 0.01)
        assert client.picker._load("worker.x", time.monotonic()) == 0
