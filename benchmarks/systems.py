"""The systems under test behind one interface: an echo callee, a caller, an event publisher
and an event subscriber each.

- ``raw-nats``: nats-py ``request`` against a plain subscription callback that publishes the
  request bytes back; bytes in, bytes out, no parsing (the floor).
- ``faststream``: a FastStream ``NatsBroker`` subscriber returning its ``Body`` argument, called
  with ``broker.request``; FastStream's logging is off (``logger=None``); the caller parses the
  reply into ``Body`` like the mesh does.
- ``mesh``: ``Mesh.request`` to an endpoint returning its argument, everything on: certificates,
  sealing of both directions, replay and deadline checks, events signed with Ed25519.

Every system uses one connection for the callee and another for the caller, also when both are
in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from faststream.nats import NatsBroker

import mesh
from mesh.testing import Trust

from .meshecho import CALLER_AGENT, ENDPOINT, EVENT_TOPIC, echo_agent, mesh_config
from .payload import Body

__all__ = [
    "SYSTEM_CLASSES",
    "Call",
    "FastStreamSystem",
    "MeshSystem",
    "RawNatsSystem",
    "Sink",
    "System",
    "serve",
]

Call = Callable[[], Awaitable[None]]
"""One request (or one event publication), awaited to completion."""

REQUEST_TIMEOUT = 5.0
# Subjects of the raw-nats and faststream callees: each system has its own, so a request never
# reaches another system's callee (all run at once on one server).
ECHO_SUBJECT = "bench.{system}.echo"  # callee in the benchmark's process
REMOTE_SUBJECT = "bench.{system}.echo-remote"  # callee in its own process
EVENT_SUBJECT = "bench.{system}.evt"
LOCAL_AGENT = "bench-echo"
REMOTE_AGENT = "bench-remote"


class Sink:
    """Counts events at the subscriber and wakes a publisher waiting for its backlog to shrink."""

    def __init__(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 0

    def reset(self) -> None:
        self.count = self.first_ns = self.last_ns = 0

    def hit(self) -> None:
        now = time.perf_counter_ns()
        if self.count == 0:
            self.first_ns = now
        self.count += 1
        self.last_ns = now
        waiter = self._waiter
        if waiter is not None and self.count >= self._wake_at and not waiter.done():
            waiter.set_result(None)

    async def wait_count(self, n: int, timeout: float) -> None:
        """Return once ``n`` events arrived; ``TimeoutError`` if they do not within ``timeout``."""
        if self.count >= n:
            return
        self._wake_at = n
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None


# --- callees (used in the benchmark's process and by ``python -m benchmarks.callee``) -------


@contextlib.asynccontextmanager
async def serve_raw(url: str, subject: str, sink: Sink | None = None) -> AsyncIterator[None]:
    system = "raw-nats"
    nc = await nats.connect(url, name="bench-raw-callee")

    async def echo(msg: Any) -> None:
        await nc.publish(msg.reply, msg.data)

    await nc.subscribe(subject, cb=echo)
    if sink is not None:

        async def on_event(msg: Any) -> None:
            sink.hit()

        await nc.subscribe(EVENT_SUBJECT.format(system=system), cb=on_event)
    await nc.flush()
    try:
        yield
    finally:
        await nc.drain()


@contextlib.asynccontextmanager
async def serve_faststream(url: str, subject: str, sink: Sink | None = None) -> AsyncIterator[None]:
    system = "faststream"
    broker = NatsBroker(url, logger=None)

    @broker.subscriber(subject)
    async def echo(body: Body) -> Body:
        return body

    if sink is not None:

        @broker.subscriber(EVENT_SUBJECT.format(system=system))
        async def on_event(body: Body) -> None:
            sink.hit()

    await broker.start()
    try:
        yield
    finally:
        await broker.stop()


@contextlib.asynccontextmanager
async def serve_mesh(
    url: str, identity: mesh.Identity, sink: Sink | None = None
) -> AsyncIterator[mesh.Mesh]:
    agent = echo_agent(identity.agent, sink)
    async with mesh.Mesh(identity, mesh_config(url), agent=agent) as m:
        yield m


def serve(
    system: str, url: str, *, identity_dir: str | None = None
) -> contextlib.AbstractAsyncContextManager[Any]:
    """The echo callee of ``system`` on its remote subject or agent name (``benchmarks.callee``)."""
    if system == "raw-nats":
        return serve_raw(url, REMOTE_SUBJECT.format(system=system))
    if system == "faststream":
        return serve_faststream(url, REMOTE_SUBJECT.format(system=system))
    if system == "mesh":
        if identity_dir is None:
            raise ValueError("the mesh callee needs --identity")
        return serve_mesh(url, mesh.load_identity(identity_dir))
    raise ValueError(f"unknown system {system!r}")


# --- systems, caller side ----------------------------------------------------------------


class System:
    """One system: an in-process echo callee and event subscriber, plus a caller connection."""

    name = ""

    def __init__(self) -> None:
        self.sink = Sink()
        self._stack = contextlib.AsyncExitStack()

    async def open(self, url: str, workdir: Path) -> None:
        raise NotImplementedError

    def remote_args(self, workdir: Path) -> list[str]:
        """Extra ``benchmarks.callee`` arguments for this system's callee in its own process."""
        return []

    async def remote_ready(self) -> None:
        """Wait until the callee in its own process can be called."""

    def call(self, body: Body, *, remote: bool) -> Call:
        raise NotImplementedError

    def publish(self, body: Body) -> Call:
        raise NotImplementedError

    async def close(self) -> None:
        await self._stack.aclose()


class RawNatsSystem(System):
    name = "raw-nats"

    async def open(self, url: str, workdir: Path) -> None:
        await self._stack.enter_async_context(
            serve_raw(url, ECHO_SUBJECT.format(system=self.name), self.sink)
        )
        self.nc = await nats.connect(url, name="bench-raw-caller")
        self._stack.push_async_callback(self.nc.drain)

    def call(self, body: Body, *, remote: bool) -> Call:
        data = body.model_dump_json().encode()
        subject = (REMOTE_SUBJECT if remote else ECHO_SUBJECT).format(system=self.name)
        request = self.nc.request

        async def call() -> None:
            reply = await request(subject, data, timeout=REQUEST_TIMEOUT)
            if len(reply.data) != len(data):
                raise RuntimeError(f"echo returned {len(reply.data)} bytes, sent {len(data)}")

        return call

    def publish(self, body: Body) -> Call:
        data = body.model_dump_json().encode()
        nc = self.nc
        subject = EVENT_SUBJECT.format(system=self.name)

        async def publish() -> None:
            await nc.publish(subject, data)

        return publish


class FastStreamSystem(System):
    name = "faststream"

    async def open(self, url: str, workdir: Path) -> None:
        await self._stack.enter_async_context(
            serve_faststream(url, ECHO_SUBJECT.format(system=self.name), self.sink)
        )
        self.broker = NatsBroker(url, logger=None)
        await self.broker.start()
        self._stack.push_async_callback(self.broker.stop)

    def call(self, body: Body, *, remote: bool) -> Call:
        subject = (REMOTE_SUBJECT if remote else ECHO_SUBJECT).format(system=self.name)
        broker = self.broker

        async def call() -> None:
            reply = await broker.request(body, subject, timeout=REQUEST_TIMEOUT)
            Body.model_validate_json(reply.body)

        return call

    def publish(self, body: Body) -> Call:
        broker = self.broker
        subject = EVENT_SUBJECT.format(system=self.name)

        async def publish() -> None:
            await broker.publish(body, subject)

        return publish


class MeshSystem(System):
    name = "mesh"

    def __init__(self) -> None:
        super().__init__()
        self.trust = Trust()

    async def open(self, url: str, workdir: Path) -> None:
        await self._stack.enter_async_context(
            serve_mesh(url, self.trust.identity(LOCAL_AGENT), self.sink)
        )
        self.caller = await self._stack.enter_async_context(
            mesh.Mesh(self.trust.identity(CALLER_AGENT), mesh_config(url))
        )
        await self.caller.wait_for(LOCAL_AGENT)

    def remote_args(self, workdir: Path) -> list[str]:
        directory = workdir / "remote-identity"
        mesh.save_identity(self.trust.identity(REMOTE_AGENT), directory)
        return ["--identity", str(directory)]

    async def remote_ready(self) -> None:
        await self.caller.wait_for(REMOTE_AGENT, timeout=30.0)

    def call(self, body: Body, *, remote: bool) -> Call:
        agent = REMOTE_AGENT if remote else LOCAL_AGENT
        request = self.caller.request

        async def call() -> None:
            await request(agent, ENDPOINT, body, Body)

        return call

    def publish(self, body: Body) -> Call:
        publish_event = self.caller.publish

        async def publish() -> None:
            await publish_event(EVENT_TOPIC, body)

        return publish


SYSTEM_CLASSES: dict[str, type[System]] = {
    cls.name: cls for cls in (RawNatsSystem, FastStreamSystem, MeshSystem)
}
