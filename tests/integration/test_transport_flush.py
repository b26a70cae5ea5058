"""``NatsTransport.flush`` against a real nats-server: after it returns, the server has every
subscription made before it, so a publish from another connection is delivered."""

from __future__ import annotations

import asyncio

from mesh._transport.nats import NatsTransport
from mesh.testing import NatsServer


async def test_a_subscription_made_before_a_flush_gets_another_connections_publish(
    nats_server: NatsServer,
) -> None:
    """1,000 times: subscribe on one connection, flush, publish from another: none is lost
    (nats-py's own flush loses about one in 300: its PING overtakes the queued SUB)."""
    a, b = NatsTransport([nats_server.url]), NatsTransport([nats_server.url])
    await a.connect()
    await b.connect()
    try:
        lost = 0
        for i in range(1000):
            got = asyncio.Event()

            async def received(_msg: object, got: asyncio.Event = got) -> None:
                got.set()

            sub = await a.subscribe(f"flush.{i}", received)
            await a.flush()
            await b.publish(f"flush.{i}", b"x")
            try:
                await asyncio.wait_for(got.wait(), 2.0)
            except TimeoutError:
                lost += 1
            await sub.unsubscribe()
        assert lost == 0
    finally:
        await a.close()
        await b.close()
