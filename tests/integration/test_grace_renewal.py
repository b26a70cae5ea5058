"""The registry is down through an agent's whole renewal window and past its certificate's
expiry: meanwhile the agent is refused by its peers; once a registry is back, the agent
renews on the grace path (proof of its key), saves the new certificate and serves again, with
no operator action, and the audit log says how long past expiry it was renewed. Real
nats-server, real registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pydantic import BaseModel

import mesh
from mesh import Timeouts
from mesh.control_plane import AuditRecord, TrustRoot
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration


class Ping(BaseModel):
    n: int


worker = mesh.Agent("worker")


@worker.endpoint(idempotent=True)
async def echo(req: Ping, ctx: mesh.Context) -> Ping:
    return req


@asynccontextmanager
async def running_registry(root: TrustRoot, cfg: mesh.MeshConfig) -> AsyncIterator[mesh.Mesh]:
    identity = root.issue_identity("registry", roles=["registry"])
    async with mesh.Mesh(identity, cfg, agent=reg.registry, trust_root=root) as registry:
        yield registry


async def grace_renewals(m: mesh.Mesh, agent: str) -> list[AuditRecord]:
    records, problems = await m.control.read_audit()
    assert problems == []
    return [
        r
        for r in records
        if r.kind == "identity.renewed" and r.subject == agent and r.details.get("via") == "grace"
    ]


async def until(check: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_agent_recovers_after_the_registry_was_down_past_its_expiry(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A 3 s certificate expires with no registry up: the agent drops out of its peers'
    directory; a registry starts; the agent renews through the grace path, keeps its name,
    instance and roles, saves the certificate and answers calls again; one audited grace
    renewal records how long past expiry it was."""
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    identity = root.issue_identity("worker", roles=["svc"], ttl=3)
    old = identity.certificate
    saved: list[mesh.Identity] = []
    async with (
        mesh.Mesh(root.issue_identity("client", ttl=3600), cfg) as client,
        mesh.Mesh(identity, cfg, agent=worker) as served,
    ):
        served.certificate_listeners.append(saved.append)  # what mesh-agent run saves
        await client.wait_for("worker")
        assert await client.request("worker", "echo", Ping(n=1), Ping) == Ping(n=1)

        # Past the expiry: peers drop the record (its certificate no longer verifies).
        await until(lambda: time.time() > old.not_after + 1, 10, "the expiry")
        await until(lambda: not client.directory.instances("worker"), 10, "the sweep")
        with pytest.raises((mesh.Unavailable, mesh.DeadlineExceeded)):
            await client.request("worker", "echo", Ping(n=2), Ping, timeout=1)
        assert served.identity.certificate is old  # nothing could renew it

        async with running_registry(root, cfg) as registry:
            await until(
                lambda: served.identity.certificate.serial != old.serial, 30, "the grace renewal"
            )
            new = served.identity.certificate
            assert (new.agent, new.instance, new.roles) == (old.agent, old.instance, old.roles)
            assert new.not_after > time.time()
            assert saved and saved[-1].certificate == new
            mesh.save_identity(saved[-1], tmp_path / "id")
            reloaded = mesh.load_identity(tmp_path / "id")
            assert reloaded.certificate.serial == new.serial

            await client.wait_for("worker", timeout=10)
            assert await client.request("worker", "echo", Ping(n=3), Ping) == Ping(n=3)

            records = await grace_renewals(registry, "worker")
            assert len(records) == 1, records
            details = records[0].details
            assert details["previous"] == old.serial
            # The grace renewal's certificate lives 60 s (the least), so ordinary renewals may
            # have followed it: it is the first one the agent switched to.
            assert details["serial"] == saved[0].certificate.serial
            assert details["expired_for_s"] > 0.5
            assert details["grace_s"] == Timeouts().renewal_grace
            assert records[0].actor == f"worker/{old.instance}"


async def test_past_the_grace_the_agent_is_told_to_get_a_new_join_token(
    nats_server: NatsServer,
) -> None:
    """With a grace of 1 s at the registry, a certificate expired 2 s ago is refused, signed,
    with a message that names the fix; nothing is issued."""
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    registry_cfg = test_config(
        [nats_server.url],
        timeouts=Timeouts(request=5.0, connect=10.0, drain=2.0, head_refresh=1.0, renewal_grace=1),
    )
    identity = root.issue_identity("worker", ttl=1)
    async with running_registry(root, registry_cfg) as registry:
        await until(lambda: time.time() > identity.certificate.not_after + 2, 10, "the grace")
        async with mesh.Mesh(identity, cfg, agent=worker) as served:
            with pytest.raises(mesh.Unauthenticated, match="new join token") as refused:
                await served.governance.renew_now()
            assert "beyond the renewal grace of 1 s" in refused.value.message
            assert served.identity.certificate is identity.certificate
        assert await grace_renewals(registry, "worker") == []
