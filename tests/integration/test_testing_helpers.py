"""The test helpers the mesh ships for its users (``mesh.testing``)."""

from __future__ import annotations

import nats
import pytest

import mesh
from mesh.testing import NatsServer, Trust, container_server, test_config

pytestmark = pytest.mark.integration  # container_server starts one without a fixture


async def test_server_from_testcontainers_when_docker_exists() -> None:
    """With a Docker engine the server can come from testcontainers; without one this test is
    skipped and says why."""
    async with container_server() as srv:
        nc = await nats.connect(srv.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"])
            assert (await js.publish("t.1", b"x")).seq == 1
        finally:
            await nc.close()


async def test_fixture_server_and_trust_give_a_working_mesh(
    nats_server: NatsServer, trust: Trust
) -> None:
    """The `nats_server` and `trust` fixtures are all a user's test needs for a real mesh."""
    async with mesh.Mesh(trust.identity("solo"), test_config([nats_server.url])) as m:
        assert m.ready
        assert m.identity.certificate.agent == "solo"
