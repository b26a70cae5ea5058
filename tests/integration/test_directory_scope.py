"""A caller learns only about the agents it calls (O(N) discovery), on a real nats-server.

What each connection listens to is read from the server's own monitoring (``/connz`` for core
subscriptions, ``/jsz`` for the directory stream's consumers), not from the mesh's word.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig
from pydantic import BaseModel

import mesh
from mesh.testing import NatsServer, Trust, test_config, wait_until, watching_all


class Ping(BaseModel):
    n: int


def make_agent(name: str) -> mesh.Agent:
    agent = mesh.Agent(name)

    @agent.endpoint(idempotent=True)
    async def ping(p: Ping) -> Ping:
        return p

    return agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Monitored:
    """A nats-server with its monitoring port."""

    def __init__(self, server: NatsServer, port: int) -> None:
        self.server = server
        self.port = port

    async def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.load(reply)

        return await asyncio.to_thread(fetch)

    async def beat_subjects(self, m: mesh.Mesh) -> set[str]:
        """The beat subjects the connection of ``m`` subscribes."""
        connz = await self.get("/connz?subs=1")
        name = f"{m.name}.{m.instance}"
        subs: set[str] = set()
        for conn in connz["connections"]:
            if conn.get("name") == name:
                subs |= {s for s in conn.get("subscriptions_list", []) if ".beat." in s}
        return subs

    async def directory_filters(self, m: mesh.Mesh) -> list[str]:
        """The subject filters of every consumer on the directory's stream."""
        jsz = await self.get("/jsz?consumers=true&config=true")
        filters: list[str] = []
        for account in jsz.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] != f"KV_{m.bucket}":
                    continue
                for consumer in stream.get("consumer_detail", []):
                    config = consumer["config"]
                    filters.append(config.get("filter_subject") or ",".join(
                        config.get("filter_subjects", [])
                    ))  # fmt: skip
        return filters


@pytest.fixture
async def monitored() -> AsyncIterator[Monitored]:
    port = free_port()
    async with NatsServer(extra_args=["-m", str(port)]) as server:
        yield Monitored(server, port)


async def test_a_caller_watches_only_the_agents_it_calls(
    monitored: Monitored, trust: Trust
) -> None:
    """Three agents serve; a caller that calls one of them holds that agent's records only,
    subscribes that agent's beats only, and its first call needs no ``wait_for``; a serving
    agent watches nothing until it calls (or claims a keyed call: its own agent)."""
    cfg = test_config([monitored.server.url])
    async with AsyncExitStack() as stack:
        agents = {
            name: await stack.enter_async_context(
                mesh.Mesh(trust.identity(name), cfg, agent=make_agent(name))
            )
            for name in ("red", "green", "blue")
        }
        alice = await stack.enter_async_context(mesh.Mesh(trust.identity("alice"), cfg))
        assert alice.directory.all() == []
        assert await monitored.beat_subjects(alice) == set()

        # The first call opens red's watch and waits for its records: no wait_for first.
        assert await alice.request("red", "ping", Ping(n=1), Ping) == Ping(n=1)
        await asyncio.sleep(4 * cfg.directory.heartbeat)  # every agent has put and beaten since

        assert {r.agent for r in alice.directory.all()} == {"red"}
        assert alice.directory.loaded("red") and not alice.directory.loaded("green")
        assert await monitored.beat_subjects(alice) == {f"{cfg.prefix}.beat.red.*"}
        assert sum(alice.directory.refused.values()) == 0
        green = agents["green"]
        assert green.directory.all() == []
        assert await monitored.beat_subjects(green) == set()
        # One filtered consumer per watch: alice's of red.
        filters = await monitored.directory_filters(alice)
        assert filters == [f"$KV.{alice.bucket}.red.*"], filters

        # A second instance of red appears in the caller's view through its watch.
        late = await stack.enter_async_context(
            mesh.Mesh(trust.identity("red"), cfg, agent=make_agent("red"))
        )
        await wait_until(lambda: alice.directory.get(f"red.{late.instance}") is not None)
        # A call to another agent opens its watch too.
        assert await alice.request("blue", "ping", Ping(n=2), Ping) == Ping(n=2)
        assert {r.agent for r in alice.directory.all()} == {"red", "blue"}


async def test_watch_all_lists_every_agent_and_closes_the_single_watches(
    monitored: Monitored, trust: Trust
) -> None:
    """``DirectoryConfig.scope = "all"`` (the admin tools') lists every agent from the start;
    ``watch_all`` turns a caller that watched one agent into one that watches all, with one
    consumer and one beat subscription instead of one per agent."""
    cfg = test_config([monitored.server.url])
    async with AsyncExitStack() as stack:
        for name in ("red", "green"):
            await stack.enter_async_context(
                mesh.Mesh(trust.identity(name), cfg, agent=make_agent(name))
            )
        admin = await stack.enter_async_context(
            mesh.Mesh(trust.identity("admin"), watching_all(cfg))
        )
        assert {r.agent for r in admin.directory.all()} == {"red", "green"}
        assert await monitored.beat_subjects(admin) == {f"{cfg.prefix}.beat.*.*"}

        alice = await stack.enter_async_context(mesh.Mesh(trust.identity("alice"), cfg))
        await alice.request("red", "ping", Ping(n=1), Ping)
        await alice.directory.watch_all(5)
        assert {r.agent for r in alice.directory.all()} == {"red", "green"}
        await wait_until(
            lambda: alice.directory.loaded("green") and alice.directory.instances("green") != []
        )
        # The single watch's unsubscription reaches the server soon after.
        for _ in range(50):
            if await monitored.beat_subjects(alice) == {f"{cfg.prefix}.beat.*.*"}:
                break
            await asyncio.sleep(0.1)
        assert await monitored.beat_subjects(alice) == {f"{cfg.prefix}.beat.*.*"}
        assert await alice.request("green", "ping", Ping(n=2), Ping) == Ping(n=2)


async def test_a_scope_that_is_neither_is_refused() -> None:
    """A mistyped scope is a clear error, not a silent default."""
    with pytest.raises(mesh.InvalidArgument, match="scope must be 'called' or 'all'"):
        mesh.DirectoryConfig(scope="everything")  # type: ignore[arg-type]


async def test_stores_take_more_watchers_than_the_server_default(
    monitored: Monitored, trust: Trust
) -> None:
    """Every store a mesh opens lets 100,000 consumers watch it (nats-server 2.15 allows 1,000
    on a stream that sets no limit, which would refuse the 1,001st process), including one
    created before with the server's default."""
    from mesh._transport.nats import MAX_WATCHERS

    nc = await nats.connect(monitored.server.url)
    try:
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket="mesh-head"))  # as an older mesh left it
        cfg = test_config([monitored.server.url])
        async with mesh.Mesh(trust.identity("alice"), cfg, agent=make_agent("alice")) as alice:
            await alice.request("alice", "ping", Ping(n=1), Ping)
        for stream in ("KV_mesh-head", "KV_mesh-policy", f"KV_{alice.bucket}"):
            info = await js.stream_info(stream)
            assert info.config.max_consumers == MAX_WATCHERS, stream
    finally:
        await nc.close()
