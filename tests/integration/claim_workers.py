"""The agent the claims tests run in separate processes with ``mesh-agent run``: every handler
execution is appended to ``$LEDGER_LOG_DIR/<pid>.log`` before it does its work, so a test can
count executions across processes, including those of a process killed mid-handler."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from mesh import Agent, Context


class Charge(BaseModel):
    key: str
    work_ms: int = 0


class Receipt(BaseModel):
    key: str
    instance: str


ledger = Agent("ledger", version="1.0.0")


@ledger.endpoint(concurrency=128)
async def charge(job: Charge, ctx: Context) -> Receipt:
    """Not idempotent: a key must never be charged twice."""
    path = os.path.join(os.environ["LEDGER_LOG_DIR"], f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job.key}\n".encode())  # in the kernel at once: survives a SIGKILL
    finally:
        os.close(fd)
    await asyncio.sleep(job.work_ms / 1000)
    return Receipt(key=job.key, instance=ctx.mesh.instance)
