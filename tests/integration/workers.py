"""Agents that the reliability tests run in separate processes with ``mesh-agent run``."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from mesh import Agent, Context


class Job(BaseModel):
    key: str
    work_ms: int = 0


class Done(BaseModel):
    key: str
    instance: str


worker = Agent("worker", version="1.0.0")


@worker.endpoint(concurrency=128)
async def work(job: Job, ctx: Context) -> Done:
    """Not idempotent: only requests with an idempotency key may be retried."""
    await asyncio.sleep(job.work_ms / 1000)
    return Done(key=job.key, instance=ctx.mesh.instance)
