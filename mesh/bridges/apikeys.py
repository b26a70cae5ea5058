"""The gateway's view of its API keys: the verified entries, revocations from the signed head,
and the check of a presented key.

``KeyRing`` reads every entry of ``<p>-gateway-keys`` at start, then follows the bucket (and
reads it all again every ``resync`` seconds, in case a watch missed a change). An entry that
does not verify with the trust root, is for another prefix or is stored under another id is
ignored: whoever can write to the broker can delete entries (those keys stop working), never
add one. Revocations come from the newest head the gateway's mesh accepted (key ids in its
``revoked`` list), so a revocation takes effect when the head does, within a second or two of
``mesh-policy gateway-key revoke``, and a broker cannot undo it by rewriting the stores.

Fail closed: with no verified head, or one that expired (the registry is away, or the broker
withholds newer heads, so a recent revocation may be missing), every key is refused with
``Unavailable`` unless the gateway runs with ``allow_stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh import Mesh, MeshError, Unauthenticated, Unavailable
from mesh._core.gateway_keys import GatewayKey, key_digest, key_id_of
from mesh._core.head import Head
from mesh._log import get_logger
from mesh._runtime.gateway_keys import GatewayKeyStore

__all__ = ["KeyRing", "Principal", "presented_key"]

log = get_logger(__name__)

RESYNC_S = 30.0
_NO_DIGEST = bytes(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from, once its key checked out.

    Attributes:
        name: ``kind:name``: the origin of the delegation chain the gateway starts.
        roles: the key's roles: the chain's scopes.
        key_id: the key's public id (for logs).
    """

    name: str
    roles: tuple[str, ...]
    key_id: str


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None  # another scheme (Basic, ...): not a key
    if api_key:
        return api_key.strip() or None
    return None


class KeyRing:
    """The keys one gateway accepts.

    Args:
        mesh: the gateway's started mesh connection (its control store and newest head).
        allow_stale: accept keys while the head is expired (availability over a revocation
            that may not have arrived).
        resync: seconds between full reads of the entries.
        clock: unix seconds.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        allow_stale: bool = False,
        resync: float = RESYNC_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mesh = mesh
        self._store = GatewayKeyStore(mesh.control)
        self._allow_stale = allow_stale
        self._resync = resync
        self._clock = clock
        self._keys: dict[str, GatewayKey] = {}
        self._task: asyncio.Task[None] | None = None
        self._revoked: tuple[Head | None, frozenset[str]] = (None, frozenset())

    def __len__(self) -> int:
        return len(self._keys)

    async def start(self, timeout: float = 10.0) -> None:
        """Read every entry, then keep following the store.

        Raises:
            Unavailable: the store could not be read within ``timeout``.
        """
        try:
            await asyncio.wait_for(self.reload(), timeout)
        except TimeoutError:
            raise Unavailable("the gateway keys could not be read in time") from None
        self._task = asyncio.create_task(self._follow(), name="mesh-gateway-keys")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> None:
        """Replace the entries held with those the store holds now."""
        self._keys = {e.id: e for e in await self._store.entries()}

    def _apply(self, key_id: str, raw: bytes | None) -> None:
        if raw is None:
            self._keys.pop(key_id, None)
            return
        try:
            self._keys[key_id] = self._store.decode(raw, key_id)
        except MeshError as exc:
            # Not ours: leave what we hold for this id as it was.
            log.warning("mesh.gateway_key_refused", key=key_id, error=exc.message)

    async def _follow(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._resync):
                    async for item in self._store.watch():
                        if item is not None:
                            self._apply(*item)
            except TimeoutError:
                pass
            except MeshError as exc:
                log.warning("mesh.watch_failed", store="gateway-keys", error=exc.message)
                await asyncio.sleep(1.0)
            with contextlib.suppress(MeshError):
                await self.reload()

    def check_fresh(self) -> None:
        """That the gateway can know of recent revocations.

        Raises:
            Unavailable: no verified head yet, or it expired (and ``allow_stale`` is off).
        """
        head = self._mesh.head
        if head is None:
            raise Unavailable(
                "the gateway has no signed head, so it cannot check revocations: is the "
                "registry running?",
                retry_after=5.0,
            )
        if not self._allow_stale and head.expired(self._clock()):
            raise Unavailable(
                f"the gateway's newest signed head (v{head.version}) expired, so a recent "
                "revocation may be missing: keys are refused until a fresh head arrives",
                retry_after=5.0,
            )

    def _revoked_ids(self) -> frozenset[str]:
        """The ids the newest head revokes (computed once per head)."""
        head = self._mesh.head
        held, ids = self._revoked
        if head is not held:
            ids = head.revoked_serials if head is not None else frozenset()
            self._revoked = (head, ids)
        return ids

    def authenticate(self, presented: str | None) -> Principal:
        """The principal of a presented key.

        Raises:
            Unauthenticated: no key, a malformed, unknown, wrong, expired or revoked one.
            Unavailable: the gateway cannot know of recent revocations (``check_fresh``).
        """
        if presented is None:
            raise Unauthenticated(
                "an API key is required: Authorization: Bearer <key> (or X-API-Key)"
            )
        key_id = key_id_of(presented)
        digest = key_digest(presented) if key_id is not None else _NO_DIGEST
        entry = self._keys.get(key_id) if key_id is not None else None
        # Compare whatever was found, in constant time, before saying why it failed.
        matches = entry.matches(digest) if entry is not None else False
        if key_id is None:
            raise Unauthenticated("the API key is malformed (expected mgk_<id>_<secret>)")
        if entry is None or not matches:
            raise Unauthenticated(f"API key {key_id} is not valid")
        self.check_fresh()
        if key_id in self._revoked_ids():
            raise Unauthenticated(f"API key {key_id} was revoked")
        if entry.expired(self._clock()):
            raise Unauthenticated(f"API key {key_id} has expired")
        return Principal(entry.principal, entry.roles, key_id)
