"""Freshness against a broker-level attacker: replays across a callee restart, replays of a
request the callee refused before opening its seal, and future-dated floods by an insider.

The attacker is a plain nats-py client. It captures genuine frames off the wire (a
subscription to ``mesh.rpc.>``) and re-sends them byte for byte; the insider ``mallory`` holds
a real certificate from the mesh's root and no roles, and seals its own requests. Each test
checks that the attack is refused and that no handler ran twice (calls are counted by body).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from pydantic import BaseModel

import mesh
from mesh import Agent, Identity, Limits
from mesh._core.crypto import derive_pair_key, seal_frame
from mesh._core.envelope import HDR_DEADLINE, Header, Kind, decode_frame, request_header
from mesh.control_plane import PolicyEngine
from mesh.testing import NatsServer, Trust, test_config, wait_until

pytestmark = pytest.mark.integration

WAIT = 5.0  # generous timeout for anything that should arrive at once (shared CI hosts)

RATE_LIMITED = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: freshness}
spec:
  rules:
    - name: alice-ok
      allow: {callers: [alice], agent: bob}
  endpoints:
    bob.echo:
      rate_limit: {per_caller: 1/s, burst: 1}
"""


class Note(BaseModel):
    text: str


def counting_bob(calls: Counter[str]) -> Agent:
    """``bob.echo``, counting its runs by the note's text."""
    bob = Agent("bob")

    @bob.endpoint
    async def echo(note: Note) -> Note:
        calls[note.text] += 1
        return Note(text=f"bob:{note.text}")

    return bob


@pytest_asyncio.fixture
async def attacker(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def settle(nc: NatsClient) -> None:
    """Return once the server processed everything this client sent before (see
    ``test_attacks.settle``: ``flush()`` alone can overtake buffered commands)."""
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox)
    await nc.publish(inbox, b"")
    await echo.next_msg(timeout=WAIT)
    await echo.unsubscribe()


async def tap(nc: NatsClient, subject: str) -> Subscription:
    """A subscription the server is known to deliver to when this returns."""
    sub = await nc.subscribe(subject)
    await settle(nc)
    return sub


async def replay(nc: NatsClient, captured: Any) -> Header:
    """Re-send a captured request byte for byte, with a reply inbox; the answer's header."""
    msg = await nc.request(captured.subject, captured.data, timeout=WAIT, headers=captured.headers)
    return decode_frame(msg.data)[0]


def sealed_request(sender: Identity, target: mesh.Mesh, text: str, ts_ms: int) -> bytes:
    """A request from ``sender`` to ``target.echo`` sealed with ``sender``'s own keys, dated
    ``ts_ms`` (the insider chooses its timestamps)."""
    aad = request_header(
        os.urandom(16), ts_ms, sender.agent, sender.instance, target.name, target.instance,
        "echo", int((time.time() + 10) * 1000), 1, sender.certificate.raw, None, None, None,
    )  # fmt: skip
    key = derive_pair_key(sender.keys.box, target.identity.certificate.box_pk)
    return seal_frame(key, aad, Note(text=text).model_dump_json().encode())


def deadline_header(frame: bytes) -> dict[str, str]:
    return {HDR_DEADLINE: str(decode_frame(frame)[0].deadline)}


async def flood_ahead(
    nc: NatsClient, sender: Identity, target: mesh.Mesh, n: int, ahead: float
) -> list[bytes]:
    """``n`` sealed requests dated ``ahead`` seconds in the future, answered to an inbox;
    returns the frames once every one has been answered."""
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    frames = []
    for i in range(n):
        frame = sealed_request(sender, target, f"flood-{i}", int((time.time() + ahead) * 1000))
        frames.append(frame)
        await nc.publish(
            f"mesh.rpc.bob.{target.instance}.echo", frame, reply=inbox,
            headers=deadline_header(frame),
        )  # fmt: skip
    for _ in range(n):
        await answers.next_msg(timeout=WAIT)
    await answers.unsubscribe()
    return frames


# --- 1. replay across a restart ----------------------------------------------------------------


async def test_request_captured_before_a_restart_is_refused_after_it(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A genuine request captured before bob restarts (same identity) is refused after it."""
    calls: Counter[str] = Counter()
    identity = trust.identity("bob")
    cfg = test_config([nats_server.url])
    wire = await tap(attacker, "mesh.rpc.>")
    async with mesh.Mesh(identity, cfg, agent=counting_bob(calls)):
        async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
            await alice.wait_for("bob")
            await alice.request("bob", "echo", Note(text="once"), Note, timeout=30)
        captured = await wire.next_msg(timeout=WAIT)
    assert calls == {"once": 1}

    async with mesh.Mesh(identity, cfg, agent=counting_bob(calls)) as bob:
        assert captured.subject == f"mesh.rpc.bob.{bob.instance}.echo"
        answer = await replay(attacker, captured)

    assert answer.kind == Kind.REFUSAL
    assert answer.status == "UNAUTHENTICATED"
    assert "predates this instance's start" in (answer.message or "")
    assert calls == {"once": 1}
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_captured_before_a_restart_is_dropped_after_it(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A genuine event captured before its subscriber restarts never reaches the new handler."""
    calls: Counter[str] = Counter()
    identity = trust.identity("bob")
    cfg = test_config([nats_server.url])

    def listener() -> Agent:
        bob = Agent("bob")

        @bob.on_event("alice", "news")
        async def news(note: Note) -> None:
            calls[note.text] += 1

        return bob

    wire = await tap(attacker, "mesh.evt.>")
    async with (
        mesh.Mesh(identity, cfg, agent=listener()),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.publish("news", Note(text="once"))
        await wait_until(lambda: calls["once"] == 1, timeout=WAIT)
    captured = await wire.next_msg(timeout=WAIT)

    async with mesh.Mesh(identity, cfg, agent=listener()) as bob:
        await attacker.publish(captured.subject, captured.data, headers=captured.headers)
        await settle(attacker)
        await wait_until(lambda: bob.stats.refused == {"UNAUTHENTICATED": 1}, timeout=WAIT)

    assert calls == {"once": 1}


# --- 2. a refusal before the seal opened leaves the id recorded --------------------------------


async def test_request_refused_by_the_rate_limit_peek_cannot_be_replayed_later(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A request refused RESOURCE_EXHAUSTED before its seal was opened is refused as a replay
    when re-sent after the bucket refilled."""
    calls: Counter[str] = Counter()
    cfg = test_config([nats_server.url], retry=mesh.RetryPolicy(attempts=1))
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=counting_bob(calls)) as bob,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        bob.governance.engine = PolicyEngine(mesh.parse_policy(RATE_LIMITED), revision=1)
        await alice.wait_for("bob")
        wire = await tap(attacker, "mesh.rpc.>")
        await alice.request("bob", "echo", Note(text="first"), Note, timeout=30)
        with pytest.raises(mesh.ResourceExhausted):
            await alice.request("bob", "echo", Note(text="second"), Note, timeout=30)
        await wire.next_msg(timeout=WAIT)
        refused = await wire.next_msg(timeout=WAIT)
        await asyncio.sleep(1.2)  # the 1/s bucket holds a token again

        answer = await replay(attacker, refused)

        assert answer.kind == Kind.REFUSAL
        assert answer.status == "UNAUTHENTICATED"
        assert "replayed message id" in (answer.message or "")
        assert calls == {"first": 1}
        assert bob.stats.refused == {"RESOURCE_EXHAUSTED": 1, "UNAUTHENTICATED": 1}


# --- 3. future-dated floods do not move the floor for other senders ----------------------------


async def test_insider_flood_dated_ahead_does_not_refuse_a_genuine_caller(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """Four times bob's seen-cache of requests dated 4 s ahead, from an insider, leave alice's
    next request served once."""
    calls: Counter[str] = Counter()
    cfg = test_config([nats_server.url], limits=Limits(seen_cache=50))
    mallory = trust.identity("mallory")
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=counting_bob(calls)) as bob,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("bob")
        await flood_ahead(attacker, mallory, bob, 200, ahead=4.0)

        answer = await alice.request("bob", "echo", Note(text="genuine"), Note)

    assert answer.text == "bob:genuine"
    assert calls["genuine"] == 1
    assert max(calls.values()) == 1
    assert "UNAUTHENTICATED" not in bob.stats.refused


async def test_flood_id_evicted_from_the_seen_cache_is_still_refused(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A future-dated request pushed out of bob's seen-cache by the insider's own flood is
    refused when replayed, and its handler ran once."""
    calls: Counter[str] = Counter()
    cfg = test_config([nats_server.url], limits=Limits(seen_cache=50))
    mallory = trust.identity("mallory")
    async with mesh.Mesh(trust.identity("bob"), cfg, agent=counting_bob(calls)) as bob:
        frames = await flood_ahead(attacker, mallory, bob, 200, ahead=4.0)
        await wait_until(lambda: sum(calls.values()) == 200, timeout=WAIT)

        msg = await attacker.request(
            f"mesh.rpc.bob.{bob.instance}.echo", frames[0], timeout=WAIT,
            headers=deadline_header(frames[0]),
        )  # fmt: skip

    answer = decode_frame(msg.data)[0]
    assert answer.kind == Kind.REFUSAL
    assert answer.status == "UNAUTHENTICATED"
    assert "replay floor" in (answer.message or "")
    assert calls["flood-0"] == 1
    assert max(calls.values()) == 1
