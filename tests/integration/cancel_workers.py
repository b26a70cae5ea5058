"""The agents of a call tree that ``tests/integration/test_cancel_tree.py`` cancels, run in
separate processes with ``mesh-agent run tests.integration.cancel_workers:tree3`` (and in the
test process, for the property test, through ``make_level``).

Every agent has the same two endpoints:

- ``node``: one handler of the tree. Its request body (``Node``) carries the whole subtree below
  it: its own path, and for each child the agent that serves it and that child's subtree, so
  the shape of the tree (uneven fan-outs included) is data the test chooses. A handler records
  ``started <path>`` when it begins, calls all its children at once (``asyncio.gather`` of
  ``ctx.request``), or, as a leaf, sleeps for ``Node.sleep_s``; and records how it ended:
  ``cancelled <path>`` (it got ``CancelledError``), ``finished <path>`` (it returned) or
  ``failed:<CODE> <path>`` (it raised).
- ``tasks``: what is still running on this instance (``Tasks``), so that a test can assert
  that nothing is left behind: calls the server is serving besides this one, asyncio tasks
  besides this one's, tasks that are a served request or a nested call, handlers started and
  not ended, and the ``node`` endpoint's counters.

A process's records go to the file named by ``CANCEL_TREE_LOG`` (one line each,
``<event> <path> <unix time>``, appended and flushed at once; each process its own file), read
at import. Without it, the records are only kept in memory (``Recorder``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import IO, Any

from pydantic import BaseModel

from mesh import Agent, Context, MeshError
from mesh._runtime.agent import Context as _Context
from mesh._runtime.server import ServerPipeline

ENV_LOG = "CANCEL_TREE_LOG"
LEVELS = 5


class Node(BaseModel):
    """One handler of the tree and everything below it."""

    path: str
    agent: str
    kids: list[Node] = []
    sleep_s: float = 600.0  # a leaf's wait: far longer than any test

    def count(self) -> int:
        return 1 + sum(k.count() for k in self.kids)

    def paths(self) -> list[str]:
        return [self.path, *(p for k in self.kids for p in k.paths())]


class Done(BaseModel):
    path: str
    leaves: int


class Probe(BaseModel):
    pass


class Tasks(BaseModel):
    agent: str
    instance: str
    in_progress: int
    """Requests the server pipeline is serving (``ServerPipeline.running``), this one not
    counted."""
    tasks: int
    """Every asyncio task of the process, this request's own not counted."""
    call_tasks: list[str]
    """Tasks that serve a request or run a nested call, this one's not counted."""
    live: list[str]
    """Paths of ``node`` handlers started and not ended."""
    requests: int
    errors: int
    last_error: str | None


class Recorder:
    """What the handlers of one process did: every event in memory (``events``: time, event,
    path), the handlers running now (``live``), and, with ``path``, a file the events are
    appended to as lines."""

    def __init__(self, path: str | None = None) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.live: set[str] = set()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115

    def record(self, event: str, path: str) -> None:
        now = time.time()
        self.events.append((now, event, path))
        if event == "started":
            self.live.add(path)
        else:
            self.live.discard(path)
        if self._file is not None:
            self._file.write(f"{event} {path} {now:.6f}\n")
            self._file.flush()

    def ended(self) -> dict[str, str]:
        """How each handler that ended did, by path."""
        return {p: e for _, e, p in self.events if e != "started"}

    def clear(self) -> None:
        self.events.clear()
        self.live.clear()


_CALL_CODES = frozenset({ServerPipeline.serve.__code__, _Context.request.__code__})


def call_tasks(exclude: asyncio.Task[Any] | None = None) -> list[str]:
    """Names (with the coroutine) of the tasks that serve a request or run a nested call:
    ``ServerPipeline.serve`` (a handler runs inside it) and ``Context.request`` (each child
    call of a ``gather``)."""
    found = []
    for task in asyncio.all_tasks():
        if task is exclude or task.done():
            continue
        coro = task.get_coro()
        code = getattr(coro, "cr_code", None)
        if code in _CALL_CODES:
            found.append(f"{task.get_name()}:{code.co_qualname}")
    return sorted(found)


def make_level(name: str, recorder: Recorder) -> Agent:
    """An agent serving ``node`` handlers of the tree (and ``tasks``), recording to
    ``recorder``."""
    agent = Agent(name)

    @agent.endpoint(concurrency=256)
    async def node(n: Node, ctx: Context) -> Done:
        recorder.record("started", n.path)
        outcome = "finished"
        try:
            if n.kids:
                done = await asyncio.gather(
                    *(ctx.request(k.agent, "node", k, Done) for k in n.kids)
                )
                leaves = sum(d.leaves for d in done)
            else:
                await asyncio.sleep(n.sleep_s)
                leaves = 1
            return Done(path=n.path, leaves=leaves)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except MeshError as exc:
            outcome = f"failed:{exc.code}"
            raise
        except Exception as exc:
            outcome = f"failed:{type(exc).__name__}"
            raise
        finally:
            recorder.record(outcome, n.path)

    @agent.on_start
    async def watch_the_tree(mesh: Any) -> None:
        # A first call to an agent opens its directory watch, kept for the process's life:
        # opened here, it is in the tasks at rest that ``tasks`` is compared with.
        for level in range(1, 6):
            await mesh.directory.watch_agent(f"tree{level}", 10)

    @agent.endpoint(concurrency=16)
    async def tasks(p: Probe, ctx: Context) -> Tasks:
        me = asyncio.current_task()
        server: ServerPipeline = ctx.mesh.server  # type: ignore[attr-defined]  # MeshRuntime's
        stats = server.endpoint_stats["node"]
        return Tasks(
            agent=name,
            instance=ctx.mesh.instance,
            in_progress=len(server.running) - 1,
            tasks=len(asyncio.all_tasks()) - 1,
            call_tasks=call_tasks(exclude=me),
            live=sorted(recorder.live),
            requests=stats.requests,
            errors=stats.errors,
            last_error=stats.last_error,
        )

    return agent


recorder = Recorder(os.environ.get(ENV_LOG) or None)
tree1 = make_level("tree1", recorder)
tree2 = make_level("tree2", recorder)
tree3 = make_level("tree3", recorder)
tree4 = make_level("tree4", recorder)
tree5 = make_level("tree5", recorder)
