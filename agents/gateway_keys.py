"""The registry's endpoints for the HTTP gateway's API keys (``mesh-policy gateway-key``):
issue, list, revoke. Each requires the admin role; issuing and revoking need the root key
and are audited (``gateway.key_issued``, ``gateway.key_revoked``).

A key is made here and returned once, in the sealed reply; the store holds only its SHA-256 in
an entry the root signs. A revocation is an ordinary signed ``Revocation`` under the key's
id: the head keeper lists it in the next head at once, and gateways follow heads, so a revoked
key is refused within a second or two and cannot be un-revoked through the stores
(``docs/protocol.md`` section 38). ``mesh_agents.registry`` imports this module at its end.
"""

from __future__ import annotations

import time

from mesh import Context, NotFound
from mesh.control_plane import (
    GATEWAY_KEY_ISSUE,
    GATEWAY_KEY_LIST,
    GATEWAY_KEY_REVOKE,
    Empty,
    GatewayKeyInfo,
    GatewayKeyIssueReply,
    GatewayKeyIssueRequest,
    GatewayKeyList,
    GatewayKeyRevokeReply,
    GatewayKeyRevokeRequest,
    GatewayKeyStore,
    Revocation,
)

from .registry import _actor, _audit, _keeper, _require_admin, _require_root, registry


@registry.endpoint(name=GATEWAY_KEY_ISSUE)
async def gateway_key_issue(req: GatewayKeyIssueRequest, ctx: Context) -> GatewayKeyIssueReply:
    """Make an API key for a principal and its roles; only its hash is stored."""
    _require_admin(ctx)
    _require_root(ctx.mesh)
    entry, key = await GatewayKeyStore(ctx.mesh.control).issue(
        req.principal, req.roles, req.ttl, _actor(ctx)
    )
    await _audit(
        ctx.mesh,
        "gateway.key_issued",
        _actor(ctx),
        entry.principal,
        id=entry.id,
        roles=list(entry.roles),
        expires_at=entry.expires_at,
    )
    return GatewayKeyIssueReply(
        key=key,
        id=entry.id,
        principal=entry.principal,
        roles=list(entry.roles),
        expires_at=entry.expires_at,
    )


@registry.endpoint(name=GATEWAY_KEY_LIST, idempotent=True)
async def gateway_key_list(_: Empty, ctx: Context) -> GatewayKeyList:
    """Every key entry that verifies, oldest first, with its revocation state."""
    _require_admin(ctx)
    revoked = {r.serial for r in await ctx.mesh.control.revocations()}
    head = _keeper(ctx.mesh).head
    if head is not None:
        revoked |= head.revoked_serials  # also those whose records someone deleted
    entries = sorted(await GatewayKeyStore(ctx.mesh.control).entries(), key=lambda e: e.issued_at)
    return GatewayKeyList(keys=[GatewayKeyInfo.of(e, revoked=e.id in revoked) for e in entries])


@registry.endpoint(name=GATEWAY_KEY_REVOKE)
async def gateway_key_revoke(req: GatewayKeyRevokeRequest, ctx: Context) -> GatewayKeyRevokeReply:
    """Revoke a key by its id: the next head lists it, and gateways refuse it."""
    _require_admin(ctx)
    _require_root(ctx.mesh)
    entry = await GatewayKeyStore(ctx.mesh.control).entry(req.id)
    if entry is None:
        raise NotFound(f"no gateway key with id {req.id!r}")
    revocation = Revocation(
        serial=entry.id,
        agent=entry.principal,
        revoked_at=time.time(),
        revoked_by=_actor(ctx),
        # Listed by heads for as long as the key could be used.
        not_after=int(entry.expires_at) + 1,
    )
    raw = await ctx.mesh.control.revoke(revocation)
    await _keeper(ctx.mesh).revoked(revocation, raw)
    await _audit(ctx.mesh, "gateway.key_revoked", _actor(ctx), entry.principal, id=entry.id)
    return GatewayKeyRevokeReply(id=entry.id, principal=entry.principal)
