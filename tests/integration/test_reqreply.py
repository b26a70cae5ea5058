"""Request/reply, events, deadlines, retries and the reply cache on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

import mesh
from mesh.testing import NatsServer, Trust, test_config, wait_until


class Ping(BaseModel):
    text: str
    work_ms: int = 0


class Pong(BaseModel):
    text: str
    caller: str
    instance: str


class Remaining(BaseModel):
    deadline: float | None
    remaining: float | None


def make_echo(calls: Counter[str], name: str = "bob") -> mesh.Agent:
    agent = mesh.Agent(name)

    @agent.endpoint(concurrency=64)
    async def echo(p: Ping, ctx: mesh.Context) -> Pong:
        calls[p.text] += 1
        if p.work_ms:
            await asyncio.sleep(p.work_ms / 1000)
        return Pong(text=p.text, caller=ctx.caller.agent, instance=ctx.mesh.instance)

    @agent.endpoint(name="slow-one", concurrency=1)
    async def slow_one(p: Ping) -> Pong:
        calls[p.text] += 1
        await asyncio.sleep(p.work_ms / 1000)
        return Pong(text=p.text, caller="", instance="")

    @agent.endpoint(idempotent=True)
    async def flaky(p: Ping) -> Pong:
        calls["flaky"] += 1
        raise mesh.Unavailable("not now")

    @agent.endpoint()
    async def broken(p: Ping) -> Pong:
        calls["broken"] += 1
        raise RuntimeError("secret internal detail 0xdeadbeef")

    return agent


@pytest.fixture
async def pair(
    nats_server: NatsServer, trust: Trust
) -> AsyncIterator[tuple[mesh.Mesh, mesh.Mesh, Counter[str]]]:
    calls: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=make_echo(calls)) as bob,
        mesh.Mesh(trust.identity("alice", roles=["coordinator"]), cfg) as alice,
    ):
        await alice.wait_for("bob")
        yield alice, bob, calls


async def test_typed_request_reply_carries_verified_caller(pair) -> None:
    """The handler sees the verified caller; the caller gets the typed reply."""
    alice, bob, calls = pair
    pong = await alice.request("bob", "echo", Ping(text="hi"), Pong)
    assert pong == Pong(text="hi", caller="alice", instance=bob.instance)
    assert calls["hi"] == 1


async def test_handler_exception_reaches_caller_as_safe_internal(pair) -> None:
    """A handler's exception becomes INTERNAL without the exception's text or repr."""
    alice, _bob, _ = pair
    with pytest.raises(mesh.Internal) as info:
        await alice.request("bob", "broken", Ping(text="x"), Pong)
    assert "deadbeef" not in str(info.value)
    assert "RuntimeError" not in str(info.value)


async def test_unknown_endpoint_is_not_found_without_sending(pair) -> None:
    """Calling an endpoint the directory does not list fails fast with NOT_FOUND."""
    alice, _bob, _ = pair
    with pytest.raises(mesh.NotFound):
        await alice.request("bob", "nope", Ping(text="x"), Pong)


async def test_unknown_agent_is_unavailable(pair) -> None:
    """Calling an agent with no live instance fails with UNAVAILABLE."""
    alice, _bob, _ = pair
    with pytest.raises(mesh.Unavailable):
        await alice.request("nobody", "echo", Ping(text="x"), Pong, timeout=0.5)


async def test_request_deadline_expired_while_queued_is_not_executed(pair) -> None:
    """A request whose deadline passes while it waits for a concurrency slot never runs."""
    alice, _bob, calls = pair
    first = asyncio.create_task(
        alice.request("bob", "slow-one", Ping(text="first", work_ms=600), Pong, timeout=3)
    )
    await wait_until(lambda: calls["first"] == 1)
    with pytest.raises(mesh.DeadlineExceeded):
        await alice.request("bob", "slow-one", Ping(text="queued", work_ms=0), Pong, timeout=0.2)
    await first
    await asyncio.sleep(0.1)
    assert calls["queued"] == 0


async def test_nested_call_inherits_remaining_deadline(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A nested call carries the original absolute deadline, so the callee sees what is left."""
    cfg = test_config([nats_server.url])
    front, back = mesh.Agent("front"), mesh.Agent("back")

    @back.endpoint()
    async def measure(p: Ping, ctx: mesh.Context) -> Remaining:
        return Remaining(deadline=ctx.deadline, remaining=ctx.remaining)

    @front.endpoint()
    async def relay(p: Ping, ctx: mesh.Context) -> Remaining:
        await asyncio.sleep(0.2)
        inner = await ctx.request("back", "measure", p, Remaining, timeout=60)
        assert ctx.deadline is not None and inner.deadline is not None
        assert abs(inner.deadline - ctx.deadline) < 0.002
        return inner

    async with (
        mesh.Mesh(trust.identity("back"), cfg, agent=back),
        mesh.Mesh(trust.identity("front"), cfg, agent=front) as f,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("front")
        await f.wait_for("back")
        started = time.time()
        result = await alice.request("front", "relay", Ping(text="x"), Remaining, timeout=2)
    assert result.deadline is not None and result.remaining is not None
    assert abs(result.deadline - (started + 2)) < 0.05
    assert result.remaining < 1.85


async def test_retries_stop_at_the_deadline(pair) -> None:
    """An idempotent endpoint that keeps failing is retried, but never past the deadline."""
    alice, _bob, calls = pair
    cfg_attempts = alice.config.retry.attempts
    started = time.monotonic()
    with pytest.raises(mesh.Unavailable):
        await alice.request("bob", "flaky", Ping(text="x"), Pong, timeout=5)
    assert calls["flaky"] == cfg_attempts
    assert time.monotonic() - started < 5
    assert alice.stats.fates["retries_exhausted"] == 1


async def test_retries_give_up_when_next_backoff_would_pass_deadline(
    nats_server: NatsServer, trust: Trust
) -> None:
    """With a deadline shorter than the backoff, the call ends at the deadline, not later."""
    calls: Counter[str] = Counter()
    slow_retry = mesh.RetryPolicy(attempts=50, backoff_base=0.2, backoff_cap=0.2)
    cfg = test_config([nats_server.url], retry=slow_retry)
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=make_echo(calls)),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("bob")
        started = time.time()
        with pytest.raises(mesh.Unavailable):
            await alice.request("bob", "flaky", Ping(text="x"), Pong, timeout=0.5)
        assert time.time() - started <= 0.5 + 0.1
        assert 1 <= calls["flaky"] < 50
        assert alice.stats.fates["deadline_exceeded"] == 1


async def test_non_idempotent_call_is_not_retried(pair) -> None:
    """A non-idempotent endpoint without an idempotency key runs once even when it fails."""
    alice, _bob, calls = pair
    with pytest.raises(mesh.Internal):
        await alice.request("bob", "broken", Ping(text="x"), Pong)
    assert calls["broken"] == 1
    assert alice.stats.fates["failed"] == 1


async def test_same_idempotency_key_is_answered_from_reply_cache(pair) -> None:
    """A second request with the same idempotency key gets the first reply; no second run."""
    alice, bob, calls = pair
    one = await alice.request("bob", "echo", Ping(text="once"), Pong, idempotency_key="k-1")
    two = await alice.request("bob", "echo", Ping(text="once"), Pong, idempotency_key="k-1")
    assert one == two
    assert calls["once"] == 1
    assert bob.endpoint_stats["echo"].replayed_from_cache == 1


async def test_retry_while_first_attempt_runs_waits_for_it(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A retried attempt arriving while the first still runs is answered by that first run."""
    calls: Counter[str] = Counter()
    retry = mesh.RetryPolicy(attempts=3, per_try_timeout=0.15)
    cfg = test_config([nats_server.url], retry=retry)
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=make_echo(calls)) as bob,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("bob")
        pong = await alice.request(
            "bob", "echo", Ping(text="slow", work_ms=400), Pong, timeout=3, idempotency_key="k-2"
        )
        assert pong.text == "slow"
        assert calls["slow"] == 1
        assert bob.endpoint_stats["echo"].replayed_from_cache >= 1
        assert alice.stats.fates["ok_after_retry"] == 1


async def test_signed_event_reaches_subscribers_with_verified_sender(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A published event reaches every subscribed agent, sender verified, once each."""
    cfg = test_config([nats_server.url])
    seen: list[tuple[str, str, str]] = []
    a, b = mesh.Agent("listener-a"), mesh.Agent("listener-b")

    @a.on_event("alice", "news")
    async def on_a(p: Ping, ctx: mesh.Context) -> None:
        seen.append(("a", p.text, ctx.caller.agent))

    @b.on_event("*", "news")
    async def on_b(p: Ping, ctx: mesh.Context) -> None:
        seen.append(("b", p.text, ctx.caller.agent))

    async with (
        mesh.Mesh(trust.identity("listener-a"), cfg, agent=a),
        mesh.Mesh(trust.identity("listener-b"), cfg, agent=b),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.publish("news", Ping(text="hello"))
        await wait_until(lambda: len(seen) == 2)
    assert sorted(seen) == [("a", "hello", "alice"), ("b", "hello", "alice")]


async def test_oversized_request_is_refused_before_sending(
    nats_server: NatsServer, trust: Trust
) -> None:
    """The caller refuses to send a body larger than the limit."""
    cfg = test_config([nats_server.url], limits=mesh.Limits(max_body=1024))
    calls: Counter[str] = Counter()
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=make_echo(calls)),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("bob")
        with pytest.raises(mesh.MessageTooLarge):
            await alice.request("bob", "echo", Ping(text="x" * 2000), Pong)
    assert calls == Counter()


async def test_load_spreads_over_instances(nats_server: NatsServer, trust: Trust) -> None:
    """Power of two choices sends traffic to every live instance."""
    cfg = test_config([nats_server.url])
    calls: Counter[str] = Counter()
    agent = make_echo(calls)
    async with (
        mesh.Mesh(trust.identity("bob"), cfg, agent=agent) as b1,
        mesh.Mesh(trust.identity("bob"), cfg, agent=agent) as b2,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await wait_until(lambda: len(alice.directory.instances("bob")) == 2)
        replies = await asyncio.gather(
            *(alice.request("bob", "echo", Ping(text=str(i), work_ms=5), Pong) for i in range(60))
        )
    used = Counter(r.instance for r in replies)
    assert set(used) == {b1.instance, b2.instance}


async def test_drained_instance_leaves_directory(nats_server: NatsServer, trust: Trust) -> None:
    """Draining deregisters at once; callers stop seeing the instance."""
    cfg = test_config([nats_server.url])
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        bob = mesh.Mesh(trust.identity("bob"), cfg, agent=make_echo(Counter()))
        await bob.start()
        await alice.wait_for("bob")
        await bob.drain()
        await wait_until(lambda: alice.directory.get(f"bob.{bob.instance}") is None)
        with pytest.raises(mesh.FailedPrecondition):
            await bob.request("bob", "echo", Ping(text="x"), Pong)


async def test_mesh_refuses_identity_of_another_agent(trust: Trust) -> None:
    """Serving an agent needs an identity issued for that agent name."""
    with pytest.raises(mesh.InvalidArgument):
        mesh.Mesh(trust.identity("alice"), agent=make_echo(Counter(), "bob"))
