"""The agent that ``tests/integration/test_traffic.py`` runs in separate processes with
``mesh-agent run tests.integration.traffic_workers:researcher`` (and the models of its calls).

A process's instance is configured by environment variables read at import:

- ``TRAFFIC_VERSION``: the version it announces (default ``1.0.0``);
- ``TRAFFIC_FAIL=1``: every call raises an exception (the caller sees INTERNAL).
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from mesh import Agent, Context


class Q(BaseModel):
    n: int = 0
    sleep_ms: int = 0


class A(BaseModel):
    n: int
    agent: str
    version: str
    instance: str
    mirrored: bool = False
    metadata: dict[str, str] = {}


def make_researcher(version: str = "1.0.0", *, fail: bool = False) -> Agent:
    """An agent with one idempotent endpoint, ``answer``, that says which instance and version
    served it (or, with ``fail``, raises on every call)."""
    agent = Agent("researcher", version=version)

    @agent.endpoint(idempotent=True, concurrency=256)
    async def answer(q: Q, ctx: Context) -> A:
        if fail:
            raise RuntimeError("TRAFFIC_FAIL is set: this instance fails every call")
        if q.sleep_ms:
            await asyncio.sleep(q.sleep_ms / 1000)
        return A(
            n=q.n,
            agent="researcher",
            version=version,
            instance=ctx.mesh.instance,
            mirrored=ctx.mirrored,
            metadata=dict(ctx.metadata),
        )

    return agent


researcher = make_researcher(
    os.environ.get("TRAFFIC_VERSION", "1.0.0"),
    fail=os.environ.get("TRAFFIC_FAIL", "") == "1",
)
