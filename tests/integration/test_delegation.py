"""Delegation chains on a real nats-server: carried through the call tree, matched by policy,
cut at the depth limit and at loops, and budgets shared by parallel branches.

What forged, spliced, replayed or widened chains get is in
``tests/security/test_delegation_attacks.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

import mesh
from mesh.control_plane import DENIAL_TOPIC, DenialReport, PolicyEngine
from mesh.testing import NatsServer, Trust, test_config, wait_until


class Ask(BaseModel):
    text: str = ""
    fan: int = 0
    hops: list[str] = []
    spend: int = 0


class Seen(BaseModel):
    origin: str
    path: list[str]
    depth: int
    scopes: list[str]
    below: list[Seen] = []


@dataclass
class World:
    meshes: dict[str, mesh.Mesh]
    runs: Counter[str] = field(default_factory=Counter)

    def install(self, policy: str) -> None:
        engine = PolicyEngine(mesh.parse_policy(policy), revision=1)
        for m in self.meshes.values():
            m.governance.engine = engine  # as if the registry had applied it


def relay(name: str, runs: Counter[str]) -> mesh.Agent:
    """An agent whose ``hop`` says what chain it saw and calls the next agents in ``hops``
    (``fan`` copies of the call to the first, in parallel)."""
    agent = mesh.Agent(name)

    @agent.endpoint(concurrency=64)
    async def hop(ask: Ask, ctx: mesh.Context) -> Seen:
        runs[name] += 1
        d = ctx.delegation
        seen = Seen(
            origin=d.origin if d else ctx.caller.agent,
            path=list(d.path) if d else [ctx.caller.agent],
            depth=d.depth if d else 1,
            scopes=list(d.scopes) if d else [],
        )
        if ask.spend:
            await ctx.spend(ask.spend)
        if ask.hops:
            nxt, rest = ask.hops[0], ask.hops[1:]
            calls = [
                ctx.request(nxt, "hop", Ask(hops=rest, spend=ask.spend), Seen)
                for _ in range(max(1, ask.fan))
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            seen.below = [r for r in results if isinstance(r, Seen)]
            errors = [r for r in results if not isinstance(r, Seen)]
            if errors and not seen.below:
                raise errors[0]
        return seen

    return agent


@pytest.fixture
async def world(nats_server: NatsServer, trust: Trust) -> AsyncIterator[World]:
    runs: Counter[str] = Counter()
    cfg = test_config([nats_server.url])
    chained = test_config([nats_server.url], delegation=True)
    names = ("planner", "assistant", "vault", "librarian")
    async with (
        mesh.Mesh(trust.identity("intern"), chained) as intern,
        mesh.Mesh(trust.identity("boss", roles=["admin"]), chained) as boss,
        mesh.Mesh(trust.identity("planner"), cfg, agent=relay("planner", runs)) as planner,
        mesh.Mesh(trust.identity("assistant"), cfg, agent=relay("assistant", runs)) as assistant,
        mesh.Mesh(trust.identity("vault"), cfg, agent=relay("vault", runs)) as vault,
        mesh.Mesh(trust.identity("librarian"), cfg, agent=relay("librarian", runs)) as librarian,
    ):
        for m in (intern, planner, assistant):
            for name in names:
                await m.wait_for(name)
        yield World(
            {"intern": intern, "boss": boss, "planner": planner, "assistant": assistant,
             "vault": vault, "librarian": librarian},
            runs,
        )  # fmt: skip


async def test_the_chain_travels_down_the_tree(world: World) -> None:
    """Each hop sees the origin, the path it came through and its depth; nested calls carry
    the chain on by themselves."""
    intern = world.meshes["intern"]
    top = await intern.request(
        "planner", "hop", Ask(hops=["assistant", "librarian"]), Seen,
        delegate=mesh.Delegate(scopes=("read",)),
    )  # fmt: skip
    assert (top.origin, top.path, top.depth, top.scopes) == ("intern", ["intern"], 1, ["read"])
    (mid,) = top.below
    assert (mid.origin, mid.path, mid.depth) == ("intern", ["intern", "planner"], 2)
    (leaf,) = mid.below
    assert (leaf.origin, leaf.path, leaf.depth, leaf.scopes) == (
        "intern", ["intern", "planner", "assistant"], 3, ["read"],
    )  # fmt: skip


CONFUSED_DEPUTY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: deputy}
spec:
  defaults: {authorization: allow}
  rules:
    - name: vault-for-admins-only
      deny: {callers: ["*"], agent: vault, origins: [intern]}
"""


async def test_a_confused_deputy_is_refused_by_the_origin(world: World) -> None:
    """The assistant may read the vault, but not for the intern: the vault sees who the work
    is for and refuses, naming the rule and the chain; for the boss it works."""
    world.install(CONFUSED_DEPUTY)
    intern, boss = world.meshes["intern"], world.meshes["boss"]
    with pytest.raises(mesh.PermissionDenied) as info:
        await intern.request("assistant", "hop", Ask(hops=["vault"]), Seen)
    assert info.value.rule == "vault-for-admins-only"
    assert "for intern via intern → assistant (depth 2)" in info.value.message
    assert world.runs["vault"] == 0
    ok = await boss.request("assistant", "hop", Ask(hops=["vault"]), Seen)
    assert ok.below[0].origin == "boss"


ONLY_THROUGH_PLANNER = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: via}
spec:
  defaults: {authorization: deny}
  rules:
    - name: vault-through-planner
      allow: {callers: ["*"], agent: vault, via: [planner]}
    - name: others
      allow: {callers: ["*"], agent: "[!v]*"}
"""


async def test_a_rule_can_ask_for_a_path(world: World) -> None:
    world.install(ONLY_THROUGH_PLANNER)
    intern = world.meshes["intern"]
    through = await intern.request("planner", "hop", Ask(hops=["vault"]), Seen)
    assert through.below[0].path == ["intern", "planner"]
    with pytest.raises(mesh.PermissionDenied, match="DENY by default deny"):
        await intern.request("assistant", "hop", Ask(hops=["vault"]), Seen)
    assert world.runs["vault"] == 1


DEPTH_2 = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: depth}
spec:
  defaults: {authorization: allow}
  delegation: {max_depth: 2}
"""


async def test_a_chain_deeper_than_policy_allows_is_cut_before_the_handler(world: World) -> None:
    world.install(DEPTH_2)
    intern = world.meshes["intern"]
    with pytest.raises(mesh.DelegationRefused, match="exceeds the maximum depth 2"):
        await intern.request("planner", "hop", Ask(hops=["assistant", "librarian"]), Seen)
    assert world.runs["librarian"] == 0 and world.runs["assistant"] == 1


async def test_depth_given_by_the_origin_is_refused_before_sending(world: World) -> None:
    """A chain whose origin allowed one hop after the first: the second nested call is
    refused in the caller, and nothing is sent."""
    intern = world.meshes["intern"]
    with pytest.raises(mesh.DelegationRefused, match="depth exhausted"):
        await intern.request(
            "planner", "hop", Ask(hops=["assistant", "librarian"]), Seen,
            delegate=mesh.Delegate(depth=1),
        )  # fmt: skip
    assert world.runs["librarian"] == 0


async def test_a_loop_is_refused_unless_policy_allows_reentry(world: World) -> None:
    intern = world.meshes["intern"]
    with pytest.raises(mesh.DelegationRefused, match="loop: planner appears twice"):
        await intern.request("planner", "hop", Ask(hops=["assistant", "planner"]), Seen)
    assert world.runs["planner"] == 1
    world.install(
        CONFUSED_DEPUTY.replace("metadata: {name: deputy}", "metadata: {name: reentry}")
        + "  delegation: {reentrant: [planner]}\n"
    )
    back = await intern.request("planner", "hop", Ask(hops=["assistant", "planner"]), Seen)
    assert back.below[0].below[0].path == ["intern", "planner", "assistant"]


async def test_a_budget_is_shared_by_parallel_branches(world: World) -> None:
    """Budget 5 for the tree: the first call takes one, so of ten parallel branches four
    run and six are refused before their handler."""
    intern = world.meshes["intern"]
    top = await intern.request(
        "planner", "hop", Ask(hops=["librarian"], fan=10), Seen,
        delegate=mesh.Delegate(budget=5),
    )  # fmt: skip
    assert len(top.below) == 4
    assert world.runs["librarian"] == 4


async def test_a_cost_budget_is_spent_by_handlers(world: World) -> None:
    intern = world.meshes["intern"]
    with pytest.raises(mesh.ResourceExhausted, match=r"cost budget .* would be exceeded"):
        await intern.request(
            "planner", "hop", Ask(hops=["librarian"], spend=60), Seen,
            delegate=mesh.Delegate(cost=100),
        )  # fmt: skip
    assert world.runs["librarian"] == 1


async def test_a_handler_cannot_widen_what_it_was_given(
    world: World, nats_server: NatsServer, trust: Trust
) -> None:
    """Narrowing only: a nested call asking for a scope the chain does not carry is refused
    in the caller, before anything is sent."""
    agent = mesh.Agent("greedy")

    @agent.endpoint()
    async def hop(ask: Ask, ctx: mesh.Context) -> Seen:
        return await ctx.request(
            "librarian", "hop", ask, Seen, delegate=mesh.Delegate(scopes=("read", "write"))
        )

    intern = world.meshes["intern"]
    async with mesh.Mesh(trust.identity("greedy"), test_config([nats_server.url]), agent=agent):
        await intern.wait_for("greedy")
        with pytest.raises(mesh.DelegationRefused, match="widens the scopes: write"):
            await intern.request(
                "greedy", "hop", Ask(), Seen, delegate=mesh.Delegate(scopes=("read",))
            )
    assert world.runs["librarian"] == 0


PER_ORIGIN = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: per-origin}
spec:
  defaults: {authorization: allow}
  endpoints:
    librarian.hop:
      rate_limit: {per_origin: 1/m}
"""


async def test_a_rate_limit_can_be_per_origin(world: World) -> None:
    """The same deputy calls for two origins: each origin has its own bucket, whichever
    agent the calls come through."""
    world.install(PER_ORIGIN)
    intern, boss = world.meshes["intern"], world.meshes["boss"]
    await intern.request("planner", "hop", Ask(hops=["librarian"]), Seen)
    with pytest.raises(mesh.ResourceExhausted, match="exceeded for assistant for intern"):
        await intern.request("assistant", "hop", Ask(hops=["librarian"]), Seen)
    assert (await boss.request("assistant", "hop", Ask(hops=["librarian"]), Seen)).below
    assert world.runs["librarian"] == 2


async def test_a_denial_report_names_the_origin_and_the_path(
    world: World, nats_server: NatsServer, trust: Trust
) -> None:
    """What the callee reports to the registry for its audit log: the caller, and who the
    call was for and through which agents."""
    reports: list[DenialReport] = []
    auditor = mesh.Agent("auditor")

    @auditor.on_event("*", DENIAL_TOPIC)
    async def denied(report: DenialReport) -> None:
        reports.append(report)

    world.install(CONFUSED_DEPUTY)
    async with mesh.Mesh(trust.identity("auditor"), test_config([nats_server.url]), agent=auditor):
        await asyncio.sleep(0.3)  # its subscription in place
        with pytest.raises(mesh.PermissionDenied):
            await world.meshes["intern"].request("assistant", "hop", Ask(hops=["vault"]), Seen)
        await wait_until(lambda: bool(reports))
    (report,) = reports
    assert (report.caller, report.agent, report.rule) == (
        "assistant",
        "vault",
        "vault-for-admins-only",
    )
    assert (report.origin, report.path) == ("intern", ["intern", "assistant"])


class Note(BaseModel):
    text: str


async def test_an_event_carries_the_chain_to_its_subscribers(
    world: World, nats_server: NatsServer, trust: Trust
) -> None:
    """An event published by a handler says who the work was for and through whom; it lends
    the subscriber no authority: the subscriber's own calls are direct."""
    cfg = test_config([nats_server.url])
    writer, reader = mesh.Agent("writer"), mesh.Agent("reader")
    heard: list[tuple[str, tuple[str, ...], int]] = []
    below: list[Seen] = []

    @writer.endpoint()
    async def hop(ask: Ask, ctx: mesh.Context) -> Seen:
        await ctx.publish("noted", Note(text=ask.text))
        return Seen(origin="", path=[], depth=0, scopes=[])

    @reader.on_event("writer", "noted")
    async def noted(note: Note, ctx: mesh.Context) -> None:
        d = ctx.delegation
        assert d is not None
        heard.append((d.origin, d.path, d.depth))
        below.append(await ctx.request("librarian", "hop", Ask(), Seen))

    async with (
        mesh.Mesh(trust.identity("writer"), cfg, agent=writer),
        mesh.Mesh(trust.identity("reader"), cfg, agent=reader),
    ):
        intern = world.meshes["intern"]
        await intern.wait_for("writer")
        await asyncio.sleep(0.3)  # the reader's subscription in place
        await intern.request("writer", "hop", Ask(text="hi"), Seen)
        await wait_until(lambda: bool(below))
    assert heard == [("intern", ("intern", "writer"), 2)]
    assert (below[0].origin, below[0].path) == ("reader", ["reader"])


async def test_a_stream_carries_the_chain(
    world: World, nats_server: NatsServer, trust: Trust
) -> None:
    """``stream`` takes ``delegate`` like ``request``, and a handler's ``ctx.stream`` carries
    its chain on."""
    teller, relay_agent = mesh.Agent("teller"), mesh.Agent("streamer")

    @teller.endpoint()
    async def tell(ask: Ask, ctx: mesh.Context) -> AsyncIterator[Seen]:
        d = ctx.delegation
        assert d is not None
        for _ in range(2):
            yield Seen(origin=d.origin, path=list(d.path), depth=d.depth, scopes=list(d.scopes))

    @relay_agent.endpoint()
    async def hop(ask: Ask, ctx: mesh.Context) -> Seen:
        seen = [s async for s in ctx.stream("teller", "tell", ask, Seen)]
        return seen[-1]

    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("teller"), cfg, agent=teller),
        mesh.Mesh(trust.identity("streamer"), cfg, agent=relay_agent),
    ):
        intern = world.meshes["intern"]
        await intern.wait_for("teller")
        await intern.wait_for("streamer")
        direct = [
            s
            async for s in intern.stream(
                "teller", "tell", Ask(), Seen, delegate=mesh.Delegate(scopes=("x",))
            )
        ]
        assert [(s.origin, s.depth, s.scopes) for s in direct] == [("intern", 1, ["x"])] * 2
        nested = await intern.request("streamer", "hop", Ask(), Seen)
        assert (nested.origin, nested.path, nested.depth) == ("intern", ["intern", "streamer"], 2)
