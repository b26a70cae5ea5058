"""The mesh side of every scenario: its config and the echo agent. Imports only the mesh (and
the body model), so the footprint child measures the mesh's memory and nothing else."""

from __future__ import annotations

from typing import Protocol

import mesh

from .payload import Body

__all__ = ["CALLER_AGENT", "ENDPOINT", "EVENT_TOPIC", "Counter", "echo_agent", "mesh_config"]

CALLER_AGENT = "bench-caller"
ENDPOINT = "echo"
EVENT_TOPIC = "tick"


class Counter(Protocol):
    """Anything with a ``hit()`` called once per event received."""

    def hit(self) -> None: ...


def mesh_config(url: str) -> mesh.MeshConfig:
    """What ``mesh.testing.test_config`` gives (5 s request deadline, short drain) but with the
    production heartbeat and TTL (tests use 4x faster ones) and a short drain grace, so setup
    and teardown stay quick."""
    return mesh.MeshConfig(
        servers=(url,),
        timeouts=mesh.Timeouts(request=5.0, connect=10.0, drain=2.0),
        directory=mesh.DirectoryConfig(heartbeat=1.0, ttl=4.0, drain_grace=0.1),
    )


def echo_agent(name: str, sink: Counter | None = None) -> mesh.Agent:
    """An agent with the ``echo`` endpoint and, given a sink, an event handler counting into it."""
    agent = mesh.Agent(name)

    @agent.endpoint(name=ENDPOINT, idempotent=True, concurrency=256)
    async def echo(q: Body, ctx: mesh.Context) -> Body:
        return q

    if sink is not None:

        @agent.on_event(CALLER_AGENT, EVENT_TOPIC)
        async def on_tick(e: Body) -> None:
            sink.hit()

    return agent
