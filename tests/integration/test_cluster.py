"""A three-node NATS cluster: the mesh keeps working when the node a caller uses dies."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import KeyValueConfig
from pydantic import BaseModel

import mesh
from mesh._transport.nats import NatsTransport
from mesh.testing import NatsCluster, Trust, test_config, wait_until


class Num(BaseModel):
    n: int


def doubler() -> mesh.Agent:
    agent = mesh.Agent("doubler")

    @agent.endpoint(idempotent=True)
    async def double(x: Num) -> Num:
        return Num(n=2 * x.n)

    return agent


def pinned(urls: list[str], first: int) -> NatsTransport:
    """A connection that prefers node ``first`` and fails over to the others in order."""
    order = urls[first:] + urls[:first]
    return NatsTransport(order, options={"dont_randomize": True})


async def test_caller_survives_loss_of_its_node_and_sees_new_instances(
    nats_cluster: NatsCluster, trust: Trust
) -> None:
    """Killing the caller's node: calls continue via another node; the directory watch is
    re-created, so an instance started afterwards is found."""
    urls = nats_cluster.urls
    cfg = test_config(
        urls, directory=mesh.DirectoryConfig(heartbeat=0.25, ttl=3.0, drain_grace=0.1)
    )
    agent = doubler()
    async with (
        mesh.Mesh(trust.identity("doubler"), cfg, agent=agent, transport=pinned(urls, 0)),
        mesh.Mesh(trust.identity("alice"), cfg, transport=pinned(urls, 1)) as alice,
    ):
        await alice.wait_for("doubler", timeout=20)
        assert (await alice.request("doubler", "double", Num(n=1), Num)).n == 2

        await nats_cluster.nodes[1].kill()
        results = await asyncio.gather(
            *(alice.request("doubler", "double", Num(n=i), Num, timeout=20) for i in range(50))
        )
        assert [r.n for r in results] == [2 * i for i in range(50)]

        # JetStream may still be electing a new stream leader: allow start-up to wait for it.
        patient = test_config(urls, timeouts=mesh.Timeouts(connect=40.0, drain=2.0))
        async with mesh.Mesh(
            trust.identity("doubler"), patient, agent=agent, transport=pinned(urls, 2)
        ) as late:
            await wait_until(
                lambda: alice.directory.get(f"doubler.{late.instance}") is not None, timeout=20
            )


async def replicas_of(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.config.num_replicas or 1
    finally:
        await nc.close()


async def test_stores_are_replicated_three_times_on_a_cluster(
    nats_cluster: NatsCluster, trust: Trust
) -> None:
    """On a cluster of three, every store the mesh creates has three replicas without any
    setting, and a store someone created with one (an R1 default, a command run during a
    registry start) is scaled up to three when a mesh opens it."""
    urls = nats_cluster.urls
    nc = await nats.connect(urls[0])
    try:
        await nc.jetstream().create_key_value(KeyValueConfig(bucket="mesh-head", replicas=1))
    finally:
        await nc.close()
    async with mesh.Mesh(trust.identity("doubler"), test_config(urls), agent=doubler()):
        for stream in ("KV_mesh-directory", "KV_mesh-policy", "KV_mesh-head"):
            assert await replicas_of(urls[0], stream) == 3, stream


async def test_a_configured_replica_count_is_used(nats_cluster: NatsCluster, trust: Trust) -> None:
    """`MeshConfig.replicas` overrides the cluster default."""
    urls = nats_cluster.urls
    cfg = test_config(urls, replicas=2, prefix="two")
    async with mesh.Mesh(trust.identity("doubler"), cfg, agent=doubler()):
        assert await replicas_of(urls[0], "KV_two-directory") == 2
