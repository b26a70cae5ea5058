"""Streamed replies, credit, progress and cancellation of one call on a real nats-server.

What a broker can do to a stream (drop, reorder, replay, splice, forge) is in
``tests/security/test_stream_attacks.py``; cancellation of whole call trees across processes in
``test_cancel_tree.py``.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

import mesh
from mesh.testing import NatsServer, Trust, test_config, wait_until


class Prompt(BaseModel):
    text: str
    tokens: int = 5
    pause_ms: int = 0


class Token(BaseModel):
    i: int
    text: str


class Done(BaseModel):
    steps: int


class Log:
    """What the handlers did, for the tests to look at."""

    def __init__(self) -> None:
        self.produced = 0
        self.started = 0
        self.cleaned = 0
        self.cancelled = 0
        self.max_ahead = 0


def make_llm(log: Log, consumed: list[int]) -> mesh.Agent:
    agent = mesh.Agent("llm")

    @agent.endpoint(concurrency=16)
    async def generate(p: Prompt, ctx: mesh.Context) -> AsyncIterator[Token]:
        log.started += 1
        try:
            for i in range(p.tokens):
                if p.pause_ms:
                    await asyncio.sleep(p.pause_ms / 1000)
                log.produced += 1
                log.max_ahead = max(log.max_ahead, log.produced - consumed[0])
                yield Token(i=i, text=f"{p.text}-{i}")
        # Cancelled while awaiting inside: CancelledError; while suspended at its yield
        # (waiting for credit): the generator is closed, GeneratorExit.
        except (asyncio.CancelledError, GeneratorExit):
            log.cancelled += 1
            raise
        finally:
            log.cleaned += 1

    @agent.endpoint()
    async def fails(p: Prompt) -> AsyncIterator[Token]:
        yield Token(i=0, text="first")
        raise mesh.PermissionDenied("no more for you", rule="demo")

    @agent.endpoint()
    async def plain(p: Prompt) -> Done:
        return Done(steps=0)

    @agent.endpoint()
    async def research(p: Prompt, ctx: mesh.Context) -> Done:
        log.started += 1
        try:
            for step in range(p.tokens):
                await ctx.progress(step / p.tokens, f"step {step}")
                await asyncio.sleep(p.pause_ms / 1000)
            await ctx.progress(1.0, "done")
            return Done(steps=p.tokens)
        except asyncio.CancelledError:
            log.cancelled += 1
            raise
        finally:
            log.cleaned += 1

    @agent.endpoint()
    async def silent(p: Prompt) -> Done:
        await asyncio.sleep(p.pause_ms / 1000)
        return Done(steps=0)

    return agent


@pytest.fixture
async def llm(
    nats_server: NatsServer, trust: Trust
) -> AsyncIterator[tuple[mesh.Mesh, mesh.Mesh, Log, list[int]]]:
    log, consumed = Log(), [0]
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("llm"), cfg, agent=make_llm(log, consumed)) as server,
        mesh.Mesh(trust.identity("alice", roles=["coordinator"]), cfg) as alice,
    ):
        await alice.wait_for("llm")
        yield alice, server, log, consumed


async def test_chunks_arrive_in_order_and_complete(llm) -> None:
    """Every chunk, in order, typed; the stream ends when the handler returns."""
    alice, _server, log, _ = llm
    got = [t async for t in alice.stream("llm", "generate", Prompt(text="hi", tokens=50), Token)]
    assert [t.i for t in got] == list(range(50))
    assert got[7].text == "hi-7"
    assert log.cleaned == 1 and log.cancelled == 0


async def test_an_empty_stream_ends_at_once(llm) -> None:
    alice, *_ = llm
    assert [
        t async for t in alice.stream("llm", "generate", Prompt(text="x", tokens=0), Token)
    ] == []


async def test_an_error_after_chunks_is_raised_after_them(llm) -> None:
    """Chunks before the handler's error are delivered, then its error, with its rule."""
    alice, *_ = llm
    got: list[Token] = []
    with pytest.raises(mesh.PermissionDenied) as info:
        async for t in alice.stream("llm", "fails", Prompt(text="x"), Token):
            got.append(t)
    assert [t.text for t in got] == ["first"]
    assert info.value.rule == "demo"


async def test_stream_and_request_are_not_interchangeable(llm) -> None:
    """A streaming endpoint refuses request() and the other way round, with a clear error."""
    alice, *_ = llm
    with pytest.raises(mesh.InvalidArgument, match="streams its reply: call it with stream"):
        await alice.request("llm", "generate", Prompt(text="x"), Token)
    with pytest.raises(mesh.InvalidArgument, match="does not stream"):
        async for _ in alice.stream("llm", "plain", Prompt(text="x"), Done):
            pass
    with pytest.raises(mesh.InvalidArgument, match="credit must be 1 to 1024"):
        alice.stream("llm", "generate", Prompt(text="x"), Token, credit=0)


async def test_a_slow_consumer_holds_the_producer_within_its_credit(llm) -> None:
    """The producer never gets more than the credit ahead of the consumer: it waits."""
    alice, _server, log, consumed = llm
    async with alice.stream(
        "llm", "generate", Prompt(text="x", tokens=200), Token, credit=8
    ) as stream:
        async for t in stream:
            consumed[0] = t.i + 1
            if t.i < 20:
                await asyncio.sleep(0.01)
    assert consumed[0] == 200
    # 8 sent ahead, and the one the generator made that waits at its yield for credit
    assert log.max_ahead <= 8 + 1, log.max_ahead


async def test_a_consumer_that_stops_reading_stalls_the_producer(llm) -> None:
    """A consumer that reads nothing more: the producer stops at the credit, memory flat."""
    alice, _server, log, _ = llm
    stream = alice.stream("llm", "generate", Prompt(text="x", tokens=10_000), Token, credit=4)
    it = aiter(stream)
    await anext(it)
    await asyncio.sleep(0.5)
    assert log.produced <= 5  # the credit of 4, and the one the generator holds at its yield
    await stream.aclose()
    await wait_until(lambda: log.cleaned == 1)
    assert log.cancelled == 1


async def test_break_cancels_the_handler(llm) -> None:
    """Leaving an ``async for`` early cancels the producer at once; its ``finally`` runs. With
    the garbage collector off: the stream must not wait for one to find a cycle."""
    alice, server, log, _ = llm
    gc.disable()
    try:
        async for t in alice.stream(
            "llm", "generate", Prompt(text="x", tokens=1000, pause_ms=5), Token
        ):
            if t.i == 3:
                break
        await wait_until(lambda: log.cleaned == 1, timeout=1)
    finally:
        gc.enable()
    assert server.endpoint_stats["generate"].last_error == "CANCELLED"
    assert log.cancelled == 1
    assert log.produced < 100
    await wait_until(lambda: not server.server.running)


async def test_cancelling_the_consumers_task_cancels_the_handler(llm) -> None:
    alice, server, log, _ = llm

    async def read() -> None:
        async for _ in alice.stream(
            "llm", "generate", Prompt(text="x", tokens=10**6, pause_ms=2), Token
        ):
            pass

    task = asyncio.create_task(read())
    await wait_until(lambda: log.produced > 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: log.cancelled == 1, timeout=5)
    await wait_until(lambda: not server.server.running)


async def test_a_vanished_caller_frees_the_producer_within_the_credit_wait(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A caller whose process is gone sends no cancel: the producer, out of credit, stops
    after ``Timeouts.credit_wait``."""
    log, consumed = Log(), [0]
    base = test_config([nats_server.url])
    cfg = test_config(
        [nats_server.url],
        timeouts=mesh.Timeouts(request=5.0, drain=2.0, head_refresh=1.0, credit_wait=0.5),
    )
    async with mesh.Mesh(trust.identity("llm"), cfg, agent=make_llm(log, consumed)) as server:
        alice = mesh.Mesh(trust.identity("alice"), base)
        await alice.start()
        await alice.wait_for("llm")
        stream = alice.stream("llm", "generate", Prompt(text="x", tokens=10**6), Token, credit=4)
        await anext(aiter(stream))
        await alice.transport.close()  # gone without a word
        started = time.monotonic()
        await wait_until(lambda: log.cleaned == 1, timeout=5)
        assert time.monotonic() - started < 2.0
        assert log.produced <= 5
        await wait_until(lambda: not server.server.running)


async def test_progress_reaches_the_caller_and_keeps_the_idle_timeout_alive(llm) -> None:
    """A long call that reports progress outlives an idle timeout shorter than it; the
    caller sees each report, and the deadline still holds."""
    alice, *_ = llm
    seen: list[mesh.Progress] = []
    done = await alice.request(
        "llm", "research", Prompt(text="x", tokens=8, pause_ms=150), Done,
        on_progress=seen.append, idle_timeout=0.5, timeout=10,
    )  # fmt: skip
    assert done.steps == 8
    assert seen[0] == mesh.Progress(0.0, "step 0")
    assert seen[-1] == mesh.Progress(1.0, "done")
    assert [p.fraction for p in seen] == sorted(p.fraction for p in seen)


async def test_an_idle_timeout_fails_a_silent_call_early(llm) -> None:
    alice, *_ = llm
    started = time.monotonic()
    with pytest.raises(mesh.DeadlineExceeded, match="idle timeout"):
        await alice.request(
            "llm", "silent", Prompt(text="x", pause_ms=3000), Done, idle_timeout=0.3, timeout=10
        )
    assert time.monotonic() - started < 2.0


async def test_progress_does_not_move_the_deadline(llm) -> None:
    alice, _server, log, _ = llm
    started = time.monotonic()
    with pytest.raises(mesh.DeadlineExceeded):
        await alice.request(
            "llm", "research", Prompt(text="x", tokens=100, pause_ms=50), Done,
            on_progress=lambda p: None, idle_timeout=1.0, timeout=0.6,
        )  # fmt: skip
    assert time.monotonic() - started < 1.5
    await wait_until(lambda: log.cleaned == 1)


async def test_a_caller_that_did_not_ask_gets_no_progress(llm) -> None:
    """Progress frames go only to callers that asked (older callers take the first reply)."""
    alice, *_ = llm
    done = await alice.request("llm", "research", Prompt(text="x", tokens=3, pause_ms=10), Done)
    assert done.steps == 3


async def test_cancelling_a_request_cancels_the_handler(llm) -> None:
    """A plain request whose task is cancelled: the handler is cancelled (code CANCELLED at
    the callee, in its endpoint counts)."""
    alice, server, log, _ = llm
    task = asyncio.create_task(
        alice.request(
            "llm", "research", Prompt(text="x", tokens=100, pause_ms=50), Done, timeout=30
        )
    )
    await wait_until(lambda: log.started == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: log.cancelled == 1, timeout=5)
    assert log.cleaned == 1
    assert server.endpoint_stats["research"].last_error == "CANCELLED"


async def test_long_deadlines_work(llm) -> None:
    """A deadline hours away is carried and honoured like any other."""
    alice, *_ = llm
    done = await alice.request(
        "llm", "research", Prompt(text="x", tokens=2, pause_ms=10), Done, timeout=6 * 3600
    )
    assert done.steps == 2


async def test_the_streaming_example(nats_server: NatsServer, trust: Trust) -> None:
    """``examples/streaming.py``: the editor reads the first words of the writer's stream,
    reports progress to its caller, and its ``break`` cancels the writer."""
    from mesh_examples import streaming

    cfg = test_config([nats_server.url])
    before = streaming.drafts.cancelled
    async with (
        mesh.Mesh(trust.identity("writer"), cfg, agent=streaming.writer),
        mesh.Mesh(trust.identity("editor"), cfg, agent=streaming.editor),
        mesh.Mesh(trust.identity("planner"), cfg) as planner,
    ):
        await planner.wait_for("editor")
        await planner.wait_for("writer")
        tokens = [
            t.text
            async for t in planner.stream(
                "writer",
                "draft",
                streaming.Prompt(topic="nats", words=5, pause_ms=0),
                streaming.Token,
            )
        ]
        assert tokens[0] == "nats" and len(tokens) == 5
        seen: list[mesh.Progress] = []
        review = await planner.request(
            "editor", "review", streaming.Prompt(topic="mesh", words=500), streaming.Review,
            on_progress=seen.append,
        )  # fmt: skip
        assert review.words == 12 and review.excerpt.startswith("mesh ")
        assert seen and seen[-1].fraction == 1.0
        await wait_until(lambda: streaming.drafts.cancelled == before + 1)


async def test_a_long_keyed_call_runs_once_for_its_whole_life_and_after(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A keyed call that runs longer than the reply cache's TTL: a duplicate sent while it
    runs waits for it, one sent right after it finished is answered from the cache (the TTL
    counts from the reply, not from the start); the handler ran once. Claims are off, so the
    reply cache alone holds it."""
    runs: list[int] = []
    agent = mesh.Agent("slowpoke")

    @agent.endpoint()
    async def think(p: Prompt, ctx: mesh.Context) -> Done:
        runs.append(1)
        for i in range(10):
            await ctx.progress(i / 10)
            await asyncio.sleep(0.12)
        return Done(steps=len(runs))

    cfg = test_config([nats_server.url], claims=False, limits=mesh.Limits(reply_cache_ttl=0.5))
    async with (
        mesh.Mesh(trust.identity("slowpoke"), cfg, agent=agent),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("slowpoke")

        def call(idle: float | None = None) -> asyncio.Task[Done]:
            return asyncio.create_task(
                alice.request(
                    "slowpoke",
                    "think",
                    Prompt(text="x"),
                    Done,
                    idempotency_key="k-long",
                    timeout=3600,
                    idle_timeout=idle,
                )
            )

        first = call(idle=0.5)  # kept alive by its progress reports
        await asyncio.sleep(0.6)  # past the TTL, while the first still runs
        during = call()  # a duplicate waits for the first's outcome (and gets no progress)
        assert (await first).steps == 1 and (await during).steps == 1
        after = await call()  # the reply is 0 s old: still cached
        assert after.steps == 1
        assert len(runs) == 1
