"""The gateway keys' store and the registry endpoints that issue, list and revoke them.

=======================  ====================  ==============================================
bucket                   key                   value (signed by the trust root)
=======================  ====================  ==============================================
``<p>-gateway-keys``     the key's id          ``GatewayKey`` entry (``mesh._core.gateway_keys``)
=======================  ====================  ==============================================

Only the registry writes entries (it holds the root key), through the admin-only endpoints
``gateway_key_issue``, ``gateway_key_list`` and ``gateway_key_revoke`` whose request and reply
models are here; a revocation is a ``Revocation`` in ``<p>-revoked`` under the key's id, which
the signed head lists until the key would have expired (``docs/protocol.md`` section 38). The
gateway reads the entries with ``GatewayKeyStore.watch`` and refuses whatever does not verify.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field, field_validator, model_validator

from mesh._core.gateway_keys import (
    GatewayKey,
    check_grant,
    decode_gateway_key,
    encode_gateway_key,
    key_digest,
    new_gateway_key,
)
from mesh._log import get_logger
from mesh._runtime.control import ControlStore
from mesh._transport.base import KeyValueBucket
from mesh.errors import InvalidArgument, MeshError

__all__ = [
    "GATEWAY_KEYS_STORE",
    "GATEWAY_KEY_ISSUE",
    "GATEWAY_KEY_LIST",
    "GATEWAY_KEY_REVOKE",
    "GatewayKeyInfo",
    "GatewayKeyIssueReply",
    "GatewayKeyIssueRequest",
    "GatewayKeyList",
    "GatewayKeyRevokeReply",
    "GatewayKeyRevokeRequest",
    "GatewayKeyStore",
]

log = get_logger(__name__)

GATEWAY_KEYS_STORE = "gateway-keys"
"""The control-plane store of key entries: bucket ``<p>-gateway-keys``."""
GATEWAY_KEY_ISSUE = "gateway_key_issue"
GATEWAY_KEY_LIST = "gateway_key_list"
GATEWAY_KEY_REVOKE = "gateway_key_revoke"
DEFAULT_KEY_TTL = 90 * 24 * 3600.0
MAX_KEY_TTL = 366 * 24 * 3600.0


class GatewayKeyStore:
    """Typed, verified access to the key entries, on a mesh's control store.

    Args:
        control: the control store (the registry's, with the root key, to write).
    """

    def __init__(self, control: ControlStore) -> None:
        self.control = control

    async def bucket(self) -> KeyValueBucket:
        return await self.control._bucket(GATEWAY_KEYS_STORE)

    def decode(self, raw: bytes, stored_as: str | None = None) -> GatewayKey:
        """Verify an entry of this mesh (``stored_as``: the KV key it was read under).

        Raises:
            DecodeError / Unauthenticated: as ``decode_gateway_key``.
        """
        control = self.control
        return decode_gateway_key(raw, control.root.public_key, control.prefix, stored_as)

    async def issue(
        self, principal: str, roles: list[str], ttl: float, issued_by: str
    ) -> tuple[GatewayKey, str]:
        """Make a key for ``principal``, store its signed entry (never the key) and return
        both: the key is shown once.

        Raises:
            InvalidArgument: a principal that is not ``kind:name``, or a role that is not a
                scope name.
            FailedPrecondition: this store cannot sign (no root key), or the id was taken.
        """
        check_grant(principal, roles)
        key_id, key = new_gateway_key()
        now = time.time()
        entry = GatewayKey(
            id=key_id,
            sha256=key_digest(key).hex(),
            principal=principal,
            roles=tuple(sorted(set(roles))),
            issued_at=now,
            expires_at=now + ttl,
            issued_by=issued_by,
        )
        raw = encode_gateway_key(entry, self.control.prefix, self.control.root.sign)
        await self.control._write(GATEWAY_KEYS_STORE, lambda kv: kv.create(key_id, raw))
        return entry, key

    async def entry(self, key_id: str) -> GatewayKey | None:
        """The verified entry of ``key_id`` (``None``: none, or one that does not verify)."""
        raw = await (await self.bucket()).get(key_id)
        if raw is None:
            return None
        try:
            return self.decode(raw, key_id)
        except MeshError:
            return None

    async def entries(self) -> list[GatewayKey]:
        """Every entry that verifies (forged or foreign ones are skipped, and logged)."""
        out = []
        for key, raw in await (await self.bucket()).items():
            try:
                out.append(self.decode(raw, key))
            except MeshError as exc:
                log.warning("mesh.gateway_key_refused", key=key, error=exc.message)
        return out

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None] | None]:
        """``(id, raw entry)`` as entries change (``raw`` ``None``: deleted); ``None`` once
        the entries already stored were delivered."""
        async for item in (await self.bucket()).watch():
            yield item


# --- the registry's endpoints ---------------------------------------------------------------


class GatewayKeyIssueRequest(BaseModel):
    """Issue a gateway key (the registry's ``gateway_key_issue``; admin role)."""

    principal: str = Field(description="who calls with the key, kind:name (e.g. user:alice)")
    roles: list[str] = Field(default=[], description="scopes of the chains started for it")
    ttl: float = Field(
        default=DEFAULT_KEY_TTL, gt=0, le=MAX_KEY_TTL, description="seconds until it expires"
    )

    @model_validator(mode="after")
    def _grant(self) -> GatewayKeyIssueRequest:
        try:
            check_grant(self.principal, self.roles)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return self


class GatewayKeyIssueReply(BaseModel):
    """The key, shown once, and its entry's public part."""

    key: str
    id: str
    principal: str
    roles: list[str]
    expires_at: float


class GatewayKeyInfo(BaseModel):
    """An entry as ``gateway_key_list`` shows it: never the key, and whether it is revoked."""

    id: str
    principal: str
    roles: list[str]
    issued_at: float
    expires_at: float
    issued_by: str
    revoked: bool

    @classmethod
    def of(cls, entry: GatewayKey, *, revoked: bool) -> GatewayKeyInfo:
        return cls(
            id=entry.id,
            principal=entry.principal,
            roles=list(entry.roles),
            issued_at=entry.issued_at,
            expires_at=entry.expires_at,
            issued_by=entry.issued_by,
            revoked=revoked,
        )


class GatewayKeyList(BaseModel):
    keys: list[GatewayKeyInfo]


class GatewayKeyRevokeRequest(BaseModel):
    """Revoke a gateway key by its id (``gateway_key_revoke``; admin role)."""

    id: str = Field(description="the key's id: the 24 hex characters after mgk_")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if len(value) != 24 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("a gateway key id is 24 lowercase hex characters")
        return value


class GatewayKeyRevokeReply(BaseModel):
    id: str
    principal: str
