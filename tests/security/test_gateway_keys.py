"""The HTTP gateway's key store against a broker-level attacker (plain nats-py, NATS
credentials only) and against insiders without the admin role: no key can be added, moved,
changed or un-revoked through the stores; what the broker can do is delete entries, which
makes those keys fail (closed).

The gateway runs in process here (its ASGI app through httpx's transport) over a real
nats-server, registry and agent; ``tests/integration/test_gateway.py`` runs the real process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import httpx
import nats
import pytest
from pydantic import BaseModel

import mesh
from mesh._core.gateway_keys import GatewayKey, encode_gateway_key, key_digest, new_gateway_key
from mesh.bridges.http import Gateway, GatewaySettings
from mesh.control_plane import (
    ApplyReply,
    ApplyRequest,
    GatewayKeyIssueReply,
    GatewayKeyIssueRequest,
    GatewayKeyRevokeReply,
    GatewayKeyRevokeRequest,
    TrustRoot,
)
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

pytestmark = pytest.mark.integration

BUCKET = "mesh-gateway-keys"
POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: keys}
spec:
  defaults: {authorization: deny}
  rules:
    - name: users
      allow: {callers: [gateway], agent: vault, endpoints: [read], origins: ["user:*"]}
    - name: admins-only
      allow: {callers: [gateway], agent: vault, endpoints: [open], origins: ["user:*"],
              scopes: [admin]}
"""


class Msg(BaseModel):
    text: str


def vault() -> mesh.Agent:
    agent = mesh.Agent("vault")

    @agent.endpoint()
    async def read(m: Msg, ctx: mesh.Context) -> Msg:
        d = ctx.delegation
        return Msg(text=f"{d.origin if d else ctx.caller.agent} {list(d.scopes) if d else []}")

    @agent.endpoint(name="open")
    async def open_(m: Msg) -> Msg:
        return Msg(text="opened")

    return agent


@dataclass
class World:
    root: TrustRoot
    admin: mesh.Mesh
    gateway: Gateway
    http: httpx.AsyncClient
    nc: nats.NATS
    server: NatsServer
    stack: AsyncExitStack

    async def issue(self, principal: str = "user:alice", roles: tuple[str, ...] = ()) -> str:
        reply = await self.admin.request(
            "registry", "gateway_key_issue",
            GatewayKeyIssueRequest(principal=principal, roles=list(roles)), GatewayKeyIssueReply,
        )  # fmt: skip
        await self.settle()
        return reply.key

    async def settle(self) -> None:
        await asyncio.sleep(0.3)  # the gateway's watch delivers the store's change

    async def call(self, key: str) -> httpx.Response:
        return await self.http.post(
            "/v1/vault/read", json={"text": "x"}, headers={"Authorization": f"Bearer {key}"}
        )

    async def kv(self) -> nats.js.kv.KeyValue:
        return await self.nc.jetstream().key_value(BUCKET)


@pytest.fixture
async def world(nats_server: NatsServer) -> AsyncIterator[World]:
    root = TrustRoot.generate()
    cfg = test_config([nats_server.url])
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("registry", roles=["registry"]), cfg,
                      agent=reg.registry, trust_root=root)
        )  # fmt: skip
        admin = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("admin", roles=["admin"]), cfg)
        )
        await stack.enter_async_context(mesh.Mesh(root.issue_identity("vault"), cfg, agent=vault()))
        await admin.wait_for("registry")
        applied = await admin.request("registry", "apply", ApplyRequest(policy=POLICY), ApplyReply)
        gateway_cfg = dataclasses.replace(cfg, caller_checks=False)
        gm = await stack.enter_async_context(
            mesh.Mesh(root.issue_identity("gateway", roles=["gateway"]), gateway_cfg)
        )
        await gm.governance.wait_for_revision(applied.revision)
        gateway = Gateway(gm, GatewaySettings(agents=("vault",), access_log=False))
        await gateway.start()
        stack.push_async_callback(gateway.close)
        await gm.wait_for("vault")
        transport = httpx.ASGITransport(app=gateway.app())
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://gateway")
        )
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        yield World(root, admin, gateway, http, nc, nats_server, stack)


def entry(key: str, **changes: object) -> GatewayKey:
    now = time.time()
    base = GatewayKey(
        id=key.split("_")[1],
        sha256=key_digest(key).hex(),
        principal="user:mallory",
        roles=("admin",),
        issued_at=now,
        expires_at=now + 3600,
        issued_by="admin/forged",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def test_a_genuine_key_works(world: World) -> None:
    """Control: a key the registry issued is served, for its principal and roles."""
    key = await world.issue(roles=("reader",))
    res = await world.call(key)
    assert res.status_code == 200, res.text
    assert res.json()["text"] == "user:alice ['reader']"


async def test_an_entry_the_broker_forges_adds_no_key(world: World) -> None:
    """Entries written by a plain NATS client: unsigned junk, one signed by another root, one
    signed by the mesh's root for another prefix (replayed from another mesh): none of their
    keys is accepted, and a genuine key keeps working."""
    genuine = await world.issue()
    kv = await world.kv()
    other = TrustRoot.generate()
    forged = []
    for sign, prefix in ((other.sign, "mesh"), (world.root.sign, "other-mesh")):
        _, key = new_gateway_key()
        e = entry(key)
        await kv.put(e.id, encode_gateway_key(e, prefix, sign))
        forged.append(key)
    _, junk_key = new_gateway_key()
    await kv.put(junk_key.split("_")[1], b"\x92\xc4\x01x\xc4\x40" + bytes(64))
    forged.append(junk_key)
    await world.settle()
    for key in forged:
        res = await world.call(key)
        assert res.status_code == 401, res.text
        assert "is not valid" in res.json()["detail"]
    assert (await world.call(genuine)).status_code == 200


async def test_a_genuine_entry_cannot_be_moved_or_changed(world: World) -> None:
    """The broker copies a genuine entry under another id, and overwrites a genuine entry with
    one naming another principal (signed by another root): both refused; the key keeps its
    own principal."""
    key = await world.issue()
    kv = await world.kv()
    key_id = key.split("_")[1]
    raw = (await kv.get(key_id)).value
    await kv.put("f" * 24, raw)  # moved
    await kv.put(key_id, encode_gateway_key(entry(key, principal="user:root"), "mesh",
                                            TrustRoot.generate().sign))  # fmt: skip
    await world.settle()
    moved = "mgk_" + "f" * 24 + "_" + key.split("_", 2)[2]
    assert (await world.call(moved)).status_code == 401
    # The forged rewrite is ignored: the entry verified before still stands for user:alice.
    res = await world.call(key)
    assert res.status_code == 200 and res.json()["text"].startswith("user:alice")
    # The store itself holds no genuine entry for it any more: a full read drops the key
    # (as a deletion would), and nothing makes it stand for user:root.
    await world.gateway.keys.reload()  # as the periodic full read does
    assert (await world.call(key)).status_code == 401


async def test_a_revoked_key_stays_revoked_whatever_the_broker_does(world: World) -> None:
    """After a revocation the broker deletes the revocation record and puts the original
    signed entry back: the key is still refused, the signed head lists it."""
    key = await world.issue()
    key_id = key.split("_")[1]
    kv = await world.kv()
    raw = (await kv.get(key_id)).value
    await world.admin.request(
        "registry", "gateway_key_revoke", GatewayKeyRevokeRequest(id=key_id), GatewayKeyRevokeReply
    )
    for _ in range(50):
        if (await world.call(key)).status_code == 401:
            break
        await asyncio.sleep(0.1)
    revoked = await world.nc.jetstream().key_value("mesh-revoked")
    await revoked.purge(key_id)
    await kv.put(key_id, raw)
    await world.settle()
    await world.gateway.keys.reload()
    res = await world.call(key)
    assert res.status_code == 401 and res.json()["detail"] == f"API key {key_id} was revoked"


async def test_a_deleted_entry_fails_closed(world: World) -> None:
    """The broker deletes a key's entry: the key is refused (it cannot be made to work)."""
    key = await world.issue()
    kv = await world.kv()
    await kv.delete(key.split("_")[1])
    await world.settle()
    assert (await world.call(key)).status_code == 401


async def test_only_an_admin_may_issue_list_or_revoke_keys(world: World) -> None:
    """The registry's key endpoints refuse a caller without the admin role (the gateway
    included), naming the rule."""
    async with mesh.Mesh(world.root.issue_identity("intern"), test_config([world.server.url])) as m:
        await m.wait_for("registry")
        for endpoint, body, reply in (
            ("gateway_key_issue", GatewayKeyIssueRequest(principal="user:x"), GatewayKeyIssueReply),
            ("gateway_key_revoke", GatewayKeyRevokeRequest(id="0" * 24), GatewayKeyRevokeReply),
        ):
            with pytest.raises(mesh.PermissionDenied) as info:
                await m.request("registry", endpoint, body, reply)
            assert info.value.rule == "registry: admin role required"


async def test_a_key_without_the_role_a_rule_asks_for_gets_nothing_more(world: World) -> None:
    """Scopes come from the key's roles only: a key without ``admin`` is refused what the rule
    for ``admin`` allows (by the callee, which sees the chain the gateway signed); one with it
    is served."""
    reader, admin = await world.issue(roles=("reader",)), await world.issue(roles=("admin",))

    async def open_with(key: str) -> httpx.Response:
        return await world.http.post(
            "/v1/vault/open", json={"text": "x"}, headers={"Authorization": f"Bearer {key}"}
        )

    refused = await open_with(reader)
    assert (refused.status_code, refused.json()["rule"]) == (403, "default deny")
    assert (await open_with(admin)).json() == {"text": "opened"}
