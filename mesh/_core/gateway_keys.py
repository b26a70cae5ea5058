"""API keys of the HTTP gateway: their format, their hash, and the signed entry that maps one
to a principal and roles (``docs/protocol.md`` section 38).

A key is ``mgk_<id>_<secret>``: ``id`` 24 lowercase hex characters (12 random bytes), public,
which names the key in logs, listings and revocations; ``secret`` 43 URL-safe base64
characters (32 random bytes). Only ``SHA-256(key)`` is stored, in an **entry** the trust root
signs: a broker can neither add a key nor change whom one stands for. A revoked key is listed
in the signed head like a revoked certificate (by its id), so it cannot be un-revoked either.

SHA-256 and not a password hash (argon2, scrypt): the key holds 256 random bits, so there is
nothing to guess and nothing a slow hash would protect; a slow hash would only make every
HTTP request pay for it.

Pure core: ``mesh._runtime.gateway_keys`` stores and watches entries; ``mesh.bridges.apikeys``
checks presented keys against them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh._core.delegation import Delegate
from mesh._core.signed import open_document, sign_document, typed_field, verify_document
from mesh.errors import DecodeError, InvalidArgument, Unauthenticated

__all__ = [
    "KEY_PREFIX",
    "KEY_TYPE",
    "GatewayKey",
    "check_grant",
    "decode_gateway_key",
    "encode_gateway_key",
    "key_digest",
    "key_id_of",
    "new_gateway_key",
]

KEY_TYPE = "mesh.gateway-key.v1"
KEY_PREFIX = "mgk_"
ID_BYTES = 12
SECRET_BYTES = 32
_KEY = re.compile(r"mgk_([0-9a-f]{24})_[A-Za-z0-9_-]{43}")
_ID = re.compile(r"[0-9a-f]{24}")
MAX_ROLES = 32


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """One verified key entry.

    Attributes:
        id: the key's public id (24 hex characters), its KV key and what revokes it.
        sha256: lowercase hex SHA-256 of the whole key's UTF-8 bytes.
        principal: who calls with it, ``kind:name`` (``user:alice``): the origin of the
            delegation chains the gateway starts for it.
        roles: what it grants, sorted: the scopes of those chains.
        issued_at / expires_at: unix seconds.
        issued_by: ``<agent>/<instance>`` of the admin who issued it.
    """

    id: str
    sha256: str
    principal: str
    roles: tuple[str, ...]
    issued_at: float
    expires_at: float
    issued_by: str

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def matches(self, digest: bytes) -> bool:
        """Whether ``digest`` (``SHA-256`` of a presented key) is this key's, in constant
        time."""
        try:
            mine = bytes.fromhex(self.sha256)
        except ValueError:
            return False
        return hmac.compare_digest(mine, digest)


def new_gateway_key(token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> tuple[str, str]:
    """A fresh key: ``(id, key)``. Show the key once; store only ``key_digest(key)``."""
    key_id = token_bytes(ID_BYTES).hex()
    secret = base64.urlsafe_b64encode(token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def key_id_of(key: str) -> str | None:
    """The id of a well-formed key (``None``: not a gateway key at all)."""
    m = _KEY.fullmatch(key)
    return m.group(1) if m else None


def key_digest(key: str) -> bytes:
    """``SHA-256`` of the key's UTF-8 bytes: what an entry stores (as hex)."""
    return hashlib.sha256(key.encode()).digest()


def check_grant(principal: str, roles: tuple[str, ...] | list[str]) -> None:
    """A principal and roles an entry may carry: ``kind:name`` and scope names, as a
    delegation chain takes them (``docs/delegation.md``).

    Raises:
        InvalidArgument: naming what is wrong.
    """
    if len(roles) > MAX_ROLES:
        raise InvalidArgument(f"a gateway key carries at most {MAX_ROLES} roles")
    try:
        Delegate(origin=principal, scopes=tuple(roles))
    except InvalidArgument as exc:
        message = exc.message.replace("scope ", "role ", 1).replace("origin ", "principal ", 1)
        raise InvalidArgument(message) from None


def encode_gateway_key(entry: GatewayKey, prefix: str, sign: Callable[[bytes], bytes]) -> bytes:
    """Sign ``entry`` for the mesh ``prefix`` with the trust root's ``sign``: a signed
    document (section 25) whose body keys come in this order."""
    body: dict[str, Any] = {
        "type": KEY_TYPE,
        "prefix": prefix,
        "id": entry.id,
        "sha256": entry.sha256,
        "principal": entry.principal,
        "roles": sorted(entry.roles),
        "issued_at": int(entry.issued_at * 1000),
        "expires_at": int(entry.expires_at * 1000),
        "issued_by": entry.issued_by,
    }
    return sign_document(body, sign)


def decode_gateway_key(
    raw: bytes, root_public_key: bytes, prefix: str, stored_as: str | None = None
) -> GatewayKey:
    """Verify and parse an entry.

    Args:
        raw: the signed document.
        root_public_key: the trust root that must have signed it.
        prefix: this mesh's subject prefix.
        stored_as: the KV key it was read under, which must be its ``id``.

    Raises:
        DecodeError: malformed, another kind of document, or fields out of their grammar.
        Unauthenticated: not signed by the trust root, for another prefix, or stored under
            another id.
    """
    what = "gateway key"
    body, packed, sig = open_document(raw, what)
    verify_document(packed, sig, root_public_key, "gateway key is not signed by the trust root")
    if body.get("type") != KEY_TYPE:
        raise DecodeError(f"document is not a gateway key (type {body.get('type')!r})")
    key_prefix = typed_field(body, "prefix", str, what)
    if key_prefix != prefix:
        raise Unauthenticated(f"gateway key is for the mesh prefix {key_prefix!r}, not {prefix!r}")
    key_id = typed_field(body, "id", str, what)
    if not _ID.fullmatch(key_id):
        raise DecodeError("gateway key field 'id' must be 24 lowercase hex characters")
    if stored_as is not None and stored_as != key_id:
        raise Unauthenticated(f"gateway key {key_id} is stored under another id ({stored_as})")
    digest = typed_field(body, "sha256", str, what)
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DecodeError("gateway key field 'sha256' must be 64 lowercase hex characters")
    principal = typed_field(body, "principal", str, what)
    roles = typed_field(body, "roles", list, what)
    if not all(type(r) is str for r in roles):
        raise DecodeError("gateway key field 'roles' must be a list of strings")
    try:
        check_grant(principal, roles)
    except InvalidArgument as exc:
        raise DecodeError(f"gateway key: {exc.message}") from None
    issued = typed_field(body, "issued_at", int, what)
    expires = typed_field(body, "expires_at", int, what)
    if expires < issued:
        raise DecodeError("gateway key expires before it was issued")
    return GatewayKey(
        id=key_id,
        sha256=digest,
        principal=principal,
        roles=tuple(sorted(roles)),
        issued_at=issued / 1000.0,
        expires_at=expires / 1000.0,
        issued_by=typed_field(body, "issued_by", str, what),
    )
