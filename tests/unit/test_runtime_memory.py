"""Runtime behaviours over mesh.testing.MemoryTransport: no nats-server, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

import mesh
from mesh import Agent, Context, DirectoryConfig, Mesh
from mesh.testing import MemoryTransport, Trust, test_config, wait_until


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    text: str
    caller: str = ""


class Other(BaseModel):
    number: int


class News(BaseModel):
    headline: str


SECRET = "secret-detail-do-not-leak"


def _config() -> mesh.MeshConfig:
    # No drain grace: these tests need no time for callers to notice a deregistration.
    return test_config(
        ["mem://"], directory=DirectoryConfig(heartbeat=0.25, ttl=1.5, drain_grace=0.0)
    )


@pytest.fixture
def broker() -> Any:
    return MemoryTransport.new_broker()


@contextlib.asynccontextmanager
async def _mesh(
    trust: Trust, broker: Any, name: str, agent: Agent | None = None
) -> AsyncIterator[Mesh]:
    async with Mesh(
        trust.identity(name), _config(), agent=agent, transport=MemoryTransport(broker)
    ) as m:
        yield m


def _bob() -> Agent:
    bob = Agent("bob")

    @bob.endpoint
    async def echo(q: Question, ctx: Context) -> Answer:
        return Answer(text=q.text.upper(), caller=ctx.caller.agent)

    @bob.endpoint
    async def explode(q: Question) -> Answer:
        raise RuntimeError(SECRET)

    return bob


@contextlib.asynccontextmanager
async def _pair(
    trust: Trust, broker: Any, bob: Agent | None = None
) -> AsyncIterator[tuple[Mesh, Mesh]]:
    async with (
        _mesh(trust, broker, "bob", bob or _bob()) as server,
        _mesh(trust, broker, "alice") as client,
    ):
        await client.wait_for("bob", timeout=2.0)
        yield server, client


class TestRequestReply:
    async def test_round_trip(self, trust: Trust, broker: Any) -> None:
        """A request reaches the handler and its typed reply comes back."""
        async with _pair(trust, broker) as (_server, client):
            answer = await client.request("bob", "echo", Question(text="hi"), Answer)

        assert answer == Answer(text="HI", caller="alice")

    async def test_handler_exception_is_internal(self, trust: Trust, broker: Any) -> None:
        """A handler's exception reaches the caller as Internal with a safe message."""
        async with _pair(trust, broker) as (_server, client):
            with pytest.raises(mesh.Internal) as ei:
                await client.request("bob", "explode", Question(text="hi"), Answer)

        text = str(ei.value)
        assert "explode" in ei.value.message
        assert SECRET not in text
        assert "RuntimeError" not in text
        assert "Traceback" not in text

    async def test_invalid_input_is_invalid_argument(self, trust: Trust, broker: Any) -> None:
        """A body that does not validate as the endpoint's model is InvalidArgument."""
        async with _pair(trust, broker) as (_server, client):
            with pytest.raises(mesh.InvalidArgument, match="Question"):
                await client.request("bob", "echo", Other(number=1), Answer)

    async def test_unknown_endpoint_is_not_found(self, trust: Trust, broker: Any) -> None:
        """Calling an endpoint the agent does not declare is NotFound."""
        async with _pair(trust, broker) as (_server, client):
            with pytest.raises(mesh.NotFound, match="nope"):
                await client.request("bob", "nope", Question(text="hi"), Answer)

    async def test_no_instances_is_unavailable(self, trust: Trust, broker: Any) -> None:
        """Calling an agent with no live instances is Unavailable."""
        async with _mesh(trust, broker, "alice") as client:
            with pytest.raises(mesh.Unavailable, match="carol"):
                await client.request("carol", "echo", Question(text="hi"), Answer)

    async def test_request_before_start(self, trust: Trust, broker: Any) -> None:
        """A request on a mesh that was never started is FailedPrecondition."""
        m = Mesh(trust.identity("alice"), _config(), transport=MemoryTransport(broker))

        with pytest.raises(mesh.FailedPrecondition, match="not ready"):
            await m.request("bob", "echo", Question(text="hi"), Answer)

    async def test_request_json_takes_text_bytes_or_a_mapping(
        self, trust: Trust, broker: Any
    ) -> None:
        """``request_json`` sends a JSON body and returns the reply parsed as JSON."""
        async with _pair(trust, broker) as (_server, client):
            replies = [
                await client.request_json("bob", "echo", body)
                for body in ('{"text": "hi"}', b'{"text": "hi"}', {"text": "hi"})
            ]

        assert replies == [{"text": "HI", "caller": "alice"}] * 3

    async def test_request_json_refuses_malformed_json_before_sending(
        self, trust: Trust, broker: Any
    ) -> None:
        """Malformed JSON is InvalidArgument before readiness is even checked."""
        m = Mesh(trust.identity("alice"), _config(), transport=MemoryTransport(broker))

        with pytest.raises(mesh.InvalidArgument, match="not valid JSON"):
            await m.request_json("bob", "echo", "{text: hi")

    async def test_request_after_close(self, trust: Trust, broker: Any) -> None:
        """A request on a closed mesh is FailedPrecondition."""
        async with _mesh(trust, broker, "alice") as client:
            pass

        with pytest.raises(mesh.FailedPrecondition):
            await client.request("bob", "echo", Question(text="hi"), Answer)

    async def test_concurrency_limit(self, trust: Trust, broker: Any) -> None:
        """An endpoint with concurrency=2 never runs more than 2 handlers at once."""
        bob = Agent("bob")
        gate = asyncio.Event()
        running = 0
        peak = 0

        @bob.endpoint(concurrency=2)
        async def slow(q: Question) -> Answer:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                await gate.wait()
            finally:
                running -= 1
            return Answer(text=q.text)

        async with _pair(trust, broker, bob) as (_server, client):
            calls = [
                asyncio.create_task(client.request("bob", "slow", Question(text=str(n)), Answer))
                for n in range(10)
            ]
            await wait_until(lambda: running >= 2, timeout=2.0)
            for _ in range(50):  # let every queued request reach the semaphore
                await asyncio.sleep(0)
            assert running == 2
            gate.set()
            answers = await asyncio.gather(*calls)

        assert peak == 2
        assert sorted(a.text for a in answers) == sorted(str(n) for n in range(10))


class TestEvents:
    async def test_event_reaches_handler_with_verified_sender(
        self, trust: Trust, broker: Any
    ) -> None:
        """A published event reaches on_event handlers with the verified sender in ctx."""
        bob = Agent("bob")
        got: asyncio.Future[tuple[News, mesh.Peer]] = asyncio.get_running_loop().create_future()

        @bob.on_event("alice", "news")
        async def on_news(event: News, ctx: Context) -> None:
            got.set_result((event, ctx.caller))

        alice_identity = trust.identity("alice")
        async with (
            _mesh(trust, broker, "bob", bob),
            Mesh(alice_identity, _config(), transport=MemoryTransport(broker)) as alice,
        ):
            await alice.publish("news", News(headline="hello"))
            event, caller = await asyncio.wait_for(got, 2.0)

        assert event == News(headline="hello")
        assert caller.agent == "alice"
        assert caller.instance == alice_identity.instance
        assert caller.serial == alice_identity.certificate.serial

    async def test_other_senders_topic_not_delivered(self, trust: Trust, broker: Any) -> None:
        """A handler for alice's events does not get carol's event on the same topic."""
        bob = Agent("bob")
        got: list[str] = []

        @bob.on_event("alice", "news")
        async def on_news(event: News, ctx: Context) -> None:
            got.append(ctx.caller.agent)

        @bob.on_event("*", "news")
        async def on_any(event: News, ctx: Context) -> None:
            got.append("any:" + ctx.caller.agent)

        async with (
            _mesh(trust, broker, "bob", bob),
            _mesh(trust, broker, "carol") as carol,
        ):
            await carol.publish("news", News(headline="hello"))
            await wait_until(lambda: len(got) >= 1, timeout=2.0)
            for _ in range(20):
                await asyncio.sleep(0)

        assert got == ["any:carol"]


class TestAgentDeclaration:
    def test_sync_endpoint_refused(self) -> None:
        """A non-async endpoint handler is InvalidArgument."""
        bob = Agent("bob")

        def sync(q: Question) -> Answer:
            return Answer(text=q.text)

        with pytest.raises(mesh.InvalidArgument, match="async"):
            bob.endpoint(sync)

    def test_non_model_parameter_refused(self) -> None:
        """An endpoint whose body parameter is not a pydantic model is InvalidArgument."""
        bob = Agent("bob")

        async def takes_str(q: str) -> Answer:
            return Answer(text=q)

        with pytest.raises(mesh.InvalidArgument, match="pydantic model"):
            bob.endpoint(takes_str)

    def test_unannotated_parameter_refused(self) -> None:
        """An endpoint whose body parameter has no annotation is InvalidArgument."""
        bob = Agent("bob")

        async def bare(q):  # type: ignore[no-untyped-def]
            return None

        with pytest.raises(mesh.InvalidArgument, match="pydantic model"):
            bob.endpoint(bare)

    def test_non_model_return_refused(self) -> None:
        """An endpoint returning something other than a model or None is InvalidArgument."""
        bob = Agent("bob")

        async def returns_str(q: Question) -> str:
            return q.text

        with pytest.raises(mesh.InvalidArgument, match="return"):
            bob.endpoint(returns_str)

    def test_too_many_parameters_refused(self) -> None:
        """An endpoint taking more than (body, ctx) is InvalidArgument."""
        bob = Agent("bob")

        async def three(q: Question, ctx: Context, extra: int) -> None:
            return None

        with pytest.raises(mesh.InvalidArgument, match="body, ctx"):
            bob.endpoint(three)

    def test_duplicate_endpoint_refused(self) -> None:
        """Declaring two endpoints with the same name is InvalidArgument."""
        bob = Agent("bob")

        async def ask(q: Question) -> None:
            return None

        bob.endpoint(ask)
        with pytest.raises(mesh.InvalidArgument, match="already has"):
            bob.endpoint(ask)

    def test_sync_event_handler_refused(self) -> None:
        """A non-async event handler is InvalidArgument."""
        bob = Agent("bob")

        def on_news(event: News) -> None:
            return None

        with pytest.raises(mesh.InvalidArgument, match="async"):
            bob.on_event("alice", "news")(on_news)

    def test_endpoint_name_from_function(self) -> None:
        """The endpoint name defaults to the function name with '_' turned into '-'."""
        bob = Agent("bob")

        @bob.endpoint(idempotent=True, concurrency=3)
        async def ask_twice(q: Question, ctx: Context) -> Answer:
            return Answer(text=q.text)

        spec = bob.endpoints["ask-twice"]
        assert (spec.input_type, spec.output_type) == (Question, Answer)
        assert (spec.idempotent, spec.concurrency, spec.wants_context) == (True, 3, True)

    def test_identity_agent_mismatch_refused(self, trust: Trust) -> None:
        """A Mesh refuses to serve an agent other than the one its identity names."""
        with pytest.raises(mesh.InvalidArgument, match="cannot serve"):
            Mesh(trust.identity("alice"), _config(), agent=_bob(), transport=MemoryTransport())

    def test_unresolvable_annotation_refused(self) -> None:
        """An endpoint annotated with a name that cannot be resolved is InvalidArgument."""
        bob = Agent("bob")

        async def ask(q: NoSuchModel) -> None:  # type: ignore[name-defined]  # noqa: F821
            return None

        with pytest.raises(mesh.InvalidArgument, match="ask"):
            bob.endpoint(ask)
