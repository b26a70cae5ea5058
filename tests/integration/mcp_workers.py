"""The mesh agent whose endpoints ``tests/integration/test_mcp.py`` serves as MCP tools through
``mesh-agent mcp``: ``calc``, run in the test process.

- ``add``: the sum of two numbers, and who the call was for (``ctx.delegation.origin``, the
  bridge's ``--principal``).
- ``slow``: reports progress ``steps`` times, ``interval_s`` apart, then answers; it records
  ``started``, then ``finished`` or ``cancelled`` (it got ``CancelledError``), like
  ``cancel_workers.py``: in memory and, with ``MCP_WORKERS_LOG`` set, appended to that file.
- ``count``: streams ``n`` ticks.
- ``secret``: what the test policy denies.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import IO

from pydantic import BaseModel, Field

from mesh import Agent, Context

ENV_LOG = "MCP_WORKERS_LOG"


class Pair(BaseModel):
    """Two numbers to add."""

    a: int
    b: int = Field(ge=0, description="a whole number, at least 0")


class Sum(BaseModel):
    total: int
    origin: str | None = None


class Steps(BaseModel):
    key: str
    steps: int = 5
    interval_s: float = 0.2


class Upto(BaseModel):
    n: int


class Tick(BaseModel):
    index: int
    text: str


class Recorder:
    """What the handlers did: ``(unix time, event, key)`` in memory, and in a file if asked."""

    def __init__(self, path: str | None = None) -> None:
        self.events: list[tuple[float, str, str]] = []
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def record(self, event: str, key: str) -> None:
        now = time.time()
        self.events.append((now, event, key))
        if self._file is not None:
            self._file.write(f"{event} {key} {now:.6f}\n")
            self._file.flush()

    def of(self, key: str) -> list[str]:
        return [e for _, e, k in self.events if k == key]


recorder = Recorder(os.environ.get(ENV_LOG) or None)
calc = Agent("calc", version="1.0.0")


@calc.endpoint(idempotent=True)
async def add(p: Pair, ctx: Context) -> Sum:
    return Sum(total=p.a + p.b, origin=ctx.delegation.origin if ctx.delegation else None)


@calc.endpoint()
async def slow(s: Steps, ctx: Context) -> Sum:
    recorder.record("started", s.key)
    outcome = "finished"
    try:
        for i in range(s.steps):
            await ctx.progress(i / s.steps, f"step {i + 1} of {s.steps}")
            await asyncio.sleep(s.interval_s)
        return Sum(total=s.steps)
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        recorder.record(outcome, s.key)


@calc.endpoint()
async def count(u: Upto, ctx: Context) -> AsyncIterator[Tick]:
    for i in range(u.n):
        yield Tick(index=i, text=f"tick {i}")
        await asyncio.sleep(0.01)


@calc.endpoint()
async def secret(p: Pair, ctx: Context) -> Sum:
    return Sum(total=-1)
