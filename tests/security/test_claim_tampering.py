"""A plain nats-py attacker with rights on the claims bucket deletes, purges or rewrites the
claim of a keyed call that ran: a retry of the call is refused honestly ("outcome unknown"),
never executed a second time silently, and never answered with a rewritten outcome."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import nats
import pytest

import mesh
from mesh._core.names import claim_key
from mesh.testing import NatsServer, Trust, test_config

from ..integration.claim_workers import Charge, Receipt


def ledger_agent(runs: list[str]) -> mesh.Agent:
    agent = mesh.Agent("ledger")

    @agent.endpoint()
    async def charge(job: Charge, ctx: mesh.Context) -> Receipt:
        runs.append(job.key)
        return Receipt(key=job.key, instance=ctx.mesh.instance)

    return agent


@contextlib.asynccontextmanager
async def attacker(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url)
    try:
        yield await nc.jetstream().key_value("mesh-claims")
    finally:
        await nc.close()


async def rewrite_outcome(kv: Any, key: str) -> None:
    """Flip a byte of the sealed outcome and put the record back (signature untouched)."""
    entry = await kv.get(key)
    packed, sig = msgpack.unpackb(entry.value)
    body = msgpack.unpackb(packed)
    box = bytearray(body["box"])
    box[-1] ^= 1
    body["box"] = bytes(box)
    await kv.put(key, msgpack.packb([msgpack.packb(body), sig]))


async def replace_with_other_claim(kv: Any, key: str) -> None:
    """Put another call's genuine done claim under this key."""
    other = await kv.get(claim_key("ledger", "alice", "charge", "donor"))
    await kv.put(key, other.value)


async def relabel_as_released(kv: Any, key: str) -> None:
    """Edit the signed state to ``released`` (which would let anyone take the claim over)."""
    entry = await kv.get(key)
    packed, sig = msgpack.unpackb(entry.value)
    body = msgpack.unpackb(packed)
    body["state"] = "released"
    await kv.put(key, msgpack.packb([msgpack.packb(body), sig]))


ATTACKS: dict[str, Callable[[Any, str], Awaitable[Any]]] = {
    "delete": lambda kv, key: kv.delete(key),
    "purge": lambda kv, key: kv.purge(key),
    "rewrite-outcome": rewrite_outcome,
    "other-claim": replace_with_other_claim,
    "relabel-released": relabel_as_released,
    "junk": lambda kv, key: kv.put(key, b"\x00junk"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_tampered_claim_never_runs_the_call_again(
    nats_server: NatsServer, trust: Trust, attack: str
) -> None:
    """After the attack, the same keyed call is refused with "outcome unknown"; the handler
    ran once in all."""
    runs: list[str] = []
    # No per-instance reply cache (entries expire at once): every retry asks the claims
    # bucket, as a retry that reaches another instance does.
    cfg = test_config([nats_server.url], limits=mesh.Limits(reply_cache_ttl=0.0))
    async with (
        mesh.Mesh(trust.identity("ledger"), cfg, agent=ledger_agent(runs)),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        await alice.wait_for("ledger")

        async def call(ik: str) -> Receipt:
            return await alice.request(
                "ledger", "charge", Charge(key=ik), Receipt, idempotency_key=ik
            )

        first = await call("order-1")
        await call("donor")
        assert await call("order-1") == first  # untampered: the first outcome again
        async with attacker(nats_server.url) as kv:
            await ATTACKS[attack](kv, claim_key("ledger", "alice", "charge", "order-1"))
        with pytest.raises(mesh.FailedPrecondition, match="outcome unknown") as err:
            await call("order-1")
        assert "may have run" in err.value.message
        assert runs == ["order-1", "donor"]
