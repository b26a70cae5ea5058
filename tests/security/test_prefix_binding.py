"""The subject prefix is bound into every frame: a frame moved to another mesh is refused.

One identity may serve several meshes sharing a broker (``MeshConfig.prefix`` ``mesh`` and
``mesh2``, each with its own policy). Nothing in a sealed header names the mesh, so a plain
nats-py attacker could capture a request on ``mesh.rpc.…`` and re-publish it on
``mesh2.rpc.…``, where it ran under the other mesh's policy; the same for an event. The prefix
is now an input of the pair key (``docs/protocol.md`` section 6) and of the event signature
(section 8): the moved request does not open, the moved event does not verify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from pydantic import BaseModel

import mesh
from mesh import Agent
from mesh._core.envelope import Kind, decode_frame
from mesh.testing import NatsServer, Trust, test_config, wait_until

pytestmark = pytest.mark.integration

WAIT = 5.0


class Note(BaseModel):
    text: str


@pytest_asyncio.fixture
async def attacker(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def tap(nc: NatsClient, subject: str) -> Subscription:
    """A subscription the server is known to deliver to when this returns (``flush`` alone
    can overtake buffered commands: a round trip through the server is waited for)."""
    sub = await nc.subscribe(subject)
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox)
    await nc.publish(inbox, b"")
    await echo.next_msg(timeout=WAIT)
    await echo.unsubscribe()
    return sub


def counting_bob(calls: Counter[str], mesh_name: str) -> Agent:
    """``bob.echo`` and a handler of alice's ``news``, counting runs by mesh and text."""
    bob = Agent("bob")

    @bob.endpoint
    async def echo(note: Note) -> Note:
        calls[f"{mesh_name}:{note.text}"] += 1
        return Note(text=f"bob:{note.text}")

    @bob.on_event("alice", "news")
    async def news(note: Note) -> None:
        calls[f"{mesh_name}:{note.text}"] += 1

    return bob


async def test_request_moved_to_another_prefix_is_refused(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """A request captured under ``mesh`` and re-published under ``mesh2`` to the same identity
    is refused UNAUTHENTICATED there, and its handler ran once."""
    calls: Counter[str] = Counter()
    bob_identity = trust.identity("bob")
    cfg, cfg2 = test_config([nats_server.url]), test_config([nats_server.url], prefix="mesh2")
    wire = await tap(attacker, "mesh.rpc.>")
    async with (
        mesh.Mesh(bob_identity, cfg, agent=counting_bob(calls, "mesh")),
        mesh.Mesh(bob_identity, cfg2, agent=counting_bob(calls, "mesh2")) as bob2,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("bob")
        assert (await alice.request("bob", "echo", Note(text="once"), Note)).text == "bob:once"
        captured = await wire.next_msg(timeout=WAIT)
        moved = f"mesh2.{captured.subject.partition('.')[2]}"
        assert moved == f"mesh2.rpc.bob.{bob2.instance}.echo"

        answer = await attacker.request(
            moved, captured.data, timeout=WAIT, headers=captured.headers
        )
        refusal = decode_frame(answer.data)[0]

        assert refusal.kind == Kind.REFUSAL
        assert refusal.status == "UNAUTHENTICATED"
        assert bob2.stats.refused == {"UNAUTHENTICATED": 1}
    assert calls == {"mesh:once": 1}


async def test_event_moved_to_another_prefix_is_dropped(
    nats_server: NatsServer, trust: Trust, attacker: NatsClient
) -> None:
    """An event captured under ``mesh`` and re-published under ``mesh2`` does not verify
    there: dropped as UNAUTHENTICATED, no handler runs."""
    calls: Counter[str] = Counter()
    bob_identity = trust.identity("bob")
    cfg, cfg2 = test_config([nats_server.url]), test_config([nats_server.url], prefix="mesh2")
    wire = await tap(attacker, "mesh.evt.>")
    async with (
        mesh.Mesh(bob_identity, cfg, agent=counting_bob(calls, "mesh")),
        mesh.Mesh(bob_identity, cfg2, agent=counting_bob(calls, "mesh2")) as bob2,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.publish("news", Note(text="once"))
        await wait_until(lambda: calls["mesh:once"] == 1, timeout=WAIT)
        captured = await wire.next_msg(timeout=WAIT)
        assert captured.subject == "mesh.evt.alice.news"

        await attacker.publish("mesh2.evt.alice.news", captured.data, headers=captured.headers)
        await wait_until(lambda: bob2.stats.refused == {"UNAUTHENTICATED": 1}, timeout=WAIT)

    assert calls == {"mesh:once": 1}
