"""The grace path for expired certificates against an attacker on the broker: a captured
request re-sent is refused, so is a request signed by another key and one for a revoked
identity; an expired certificate still gets no ordinary call through. The attacker is a plain
nats-py client against a real nats-server and a real registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import nats
import pytest
from nacl.public import PublicKey, SealedBox
from nacl.signing import VerifyKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

import mesh
from mesh._runtime.enrol import open_reply
from mesh._runtime.recovery import _REPLY_CONTEXT, grace_request
from mesh.control_plane import RevokeReply, RevokeRequest, TrustRoot
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration

RENEW = "mesh.ctl.registry.{}.renew"


@dataclass
class World:
    nc: NATS
    root: TrustRoot
    cfg: mesh.MeshConfig
    registry: mesh.Mesh
    admin: mesh.Mesh

    def sealed(self, identity: mesh.Identity, signer: mesh.Identity | None = None) -> bytes:
        """A grace renewal request for ``identity``'s certificate, signed by ``signer``'s key
        (the holder's by default), sealed for the registry instance."""
        body = grace_request(
            mesh.Identity(
                keys=(signer or identity).keys,
                certificate=identity.certificate,
                root_public_key=identity.root_public_key,
            ),
            "mesh",
            self.registry.instance,
        )
        box = SealedBox(PublicKey(self.registry.identity.certificate.box_pk))
        return box.encrypt(msgpack.packb(body, use_bin_type=True))

    async def send(self, payload: bytes, timeout: float = 2.0) -> tuple[str, str, bytes] | None:
        """The registry's signed answer ``(status, message, certificate)``, or ``None``."""
        try:
            msg = await self.nc.request(
                RENEW.format(self.registry.instance), payload, timeout=timeout
            )
        except nats.errors.TimeoutError:
            return None
        verify = VerifyKey(self.registry.identity.certificate.sign_pk)
        _, status, message, cert = open_reply(msg.data, verify, _REPLY_CONTEXT)
        return status, message, cert

    async def grace_renewals(self) -> int:
        records, _ = await self.admin.control.read_audit()
        return sum(
            1 for r in records if r.kind == "identity.renewed" and r.details.get("via") == "grace"
        )


@pytest.fixture
async def world(nats_server: NatsServer) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    nc = await nats.connect(nats_server.url)
    try:
        async with (
            mesh.Mesh(
                root.issue_identity("registry", roles=["registry"]),
                cfg,
                agent=reg.registry,
                trust_root=root,
            ) as registry,
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), cfg) as admin,
        ):
            await admin.wait_for("registry")
            yield World(nc, root, cfg, registry, admin)
    finally:
        await nc.close()


def expired(root: TrustRoot, agent: str = "worker") -> mesh.Identity:
    identity = root.issue_identity(agent, roles=["svc"], ttl=1)
    while time.time() < identity.certificate.not_after:
        time.sleep(0.05)
    return identity


async def test_a_captured_grace_request_resent_is_refused(world: World) -> None:
    """An expired agent renews once; its request, captured on the broker and re-sent with
    another reply inbox, gets no answer and issues nothing."""
    captured: list[bytes] = []

    async def capture(msg: Msg) -> None:
        captured.append(msg.data)

    sub = await world.nc.subscribe(RENEW.format("*"), cb=capture)
    await world.nc.flush()
    identity = expired(world.root)
    async with mesh.Mesh(identity, world.cfg) as agent:  # its renewal loop recovers it
        end = time.monotonic() + 15
        while agent.identity.certificate is identity.certificate:
            assert time.monotonic() < end, "no grace renewal"
            await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert captured
    assert await world.grace_renewals() == 1
    for payload in captured:
        assert await world.send(payload) is None
    assert await world.grace_renewals() == 1


async def test_the_same_request_is_taken_once(world: World) -> None:
    """A request the registry answered OK is dropped when it comes again."""
    payload = world.sealed(expired(world.root))
    first = await world.send(payload)
    assert first is not None and first[0] == "OK"
    assert await world.send(payload) is None
    assert await world.grace_renewals() == 1


async def test_a_request_signed_by_another_key_is_refused(world: World) -> None:
    """An attacker holding the public (expired) certificate but not its key: refused, signed,
    nothing issued."""
    victim = expired(world.root)
    thief = world.root.issue_identity("thief")
    answer = await world.send(world.sealed(victim, signer=thief))
    assert answer is not None
    status, message, cert = answer
    assert (status, cert) == ("UNAUTHENTICATED", b"")
    assert "not signed by the certificate's key" in message
    assert await world.grace_renewals() == 0


async def test_a_revoked_identity_is_refused(world: World) -> None:
    """An expired certificate whose serial was revoked cannot come back through the grace."""
    identity = expired(world.root)
    serial = identity.certificate.serial
    reply = await world.admin.request(
        "registry", "revoke", RevokeRequest(target=serial), RevokeReply
    )
    assert reply.revoked == [serial]
    answer = await world.send(world.sealed(identity))
    assert answer is not None
    status, message, _ = answer
    assert status == "UNAUTHENTICATED"
    assert "revoked" in message
    assert await world.grace_renewals() == 0


async def test_a_stale_request_is_refused(world: World) -> None:
    """A request dated before the replay window (held back by the broker) is refused."""
    identity = expired(world.root)
    body = grace_request(identity, "mesh", world.registry.instance, now=time.time() - 120)
    box = SealedBox(PublicKey(world.registry.identity.certificate.box_pk))
    answer = await world.send(box.encrypt(msgpack.packb(body, use_bin_type=True)))
    assert answer is not None and answer[0] == "UNAUTHENTICATED"
    assert "stale" in answer[1]


async def test_a_request_for_another_mesh_prefix_is_refused(world: World) -> None:
    """The proof names the mesh: a request signed for prefix ``other`` does not verify."""
    identity = expired(world.root)
    body = grace_request(identity, "other", world.registry.instance)
    box = SealedBox(PublicKey(world.registry.identity.certificate.box_pk))
    answer = await world.send(box.encrypt(msgpack.packb(body, use_bin_type=True)))
    assert answer is not None and answer[0] == "UNAUTHENTICATED"


async def test_an_expired_certificate_makes_no_ordinary_call(world: World) -> None:
    """Only the grace path takes an expired certificate: an ordinary request to the registry
    (here `renew` itself) is refused and ends at its deadline. (Expired past the grace, so
    that its own renewal loop cannot recover it meanwhile.)"""
    identity = world.root.issue_identity("worker", ttl=3600, now=time.time() - 8 * 86400)
    async with mesh.Mesh(identity, world.cfg) as agent:
        with pytest.raises(mesh.DeadlineExceeded, match="expired"):
            await agent.request(
                "registry",
                "renew",
                mesh.control_plane.RenewRequest(),
                mesh.control_plane.CertificateReply,
                timeout=1.0,
            )
    await asyncio.sleep(0)
    assert await world.grace_renewals() == 0
