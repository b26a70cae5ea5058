"""``mesh-policy gateway-key``: issue, list and revoke the HTTP gateway's API keys through the
registry (admin role). A key is printed once, on stdout; the registry keeps only its hash, in
an entry the trust root signs (``docs/gateway.md``, "Keys")."""

from __future__ import annotations

import re
import time

import click
from pydantic import ValidationError
from rich.table import Table

from mesh import InvalidArgument
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
)

from ._admin import admin_mesh, call_registry, err, online_command, out, when
from ._common import DURATION, Args, argument, group, option
from ._output import emit, iso, output_option

_KEY = re.compile(r"mgk_([0-9a-f]{24})_\S+")


async def cmd_key_issue(args: Args) -> int:
    """Issue a key for PRINCIPAL (printed once on stdout; only its hash is stored)."""
    roles = [r.strip() for r in (args.roles or "").split(",") if r.strip()]
    try:
        request = GatewayKeyIssueRequest(principal=args.principal, roles=roles, ttl=args.ttl)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidArgument(f"{where}: {message}" if where else message) from None
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, GATEWAY_KEY_ISSUE, request, GatewayKeyIssueReply)
    out.print(reply.key)
    err.print(
        f"gateway key {reply.id} for {reply.principal} (roles {reply.roles or 'none'}), valid "
        f"until {when(reply.expires_at)}; shown once, the registry keeps only its hash:"
    )
    err.print(f"  curl -H 'Authorization: Bearer {reply.key}' ...")
    return 0


def _state(info: GatewayKeyInfo, now: float) -> str:
    if info.revoked:
        return "revoked"
    return "expired" if info.expires_at <= now else "valid"


async def cmd_key_list(args: Args) -> int:
    """Every gateway key the registry issued (never the keys themselves)."""
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, GATEWAY_KEY_LIST, Empty(), GatewayKeyList)
    now = time.time()
    document = {
        "keys": [
            {
                "id": k.id,
                "principal": k.principal,
                "roles": list(k.roles),
                "issued_at": iso(k.issued_at),
                "expires": iso(k.expires_at),
                "issued_by": k.issued_by,
                "state": _state(k, now),
            }
            for k in reply.keys
        ]
    }

    def show() -> None:
        table = Table("id", "principal", "roles", "issued by", "expires", "state")
        for k in reply.keys:
            state = _state(k, now)
            table.add_row(
                k.id,
                k.principal,
                ",".join(k.roles),
                k.issued_by,
                when(k.expires_at),
                "[red]revoked[/]" if state == "revoked" else state,
            )
        out.print(table)

    emit(args, document, show)
    return 0


def _key_id(text: str) -> str:
    """An id, or the id of a whole key pasted instead."""
    m = _KEY.fullmatch(text.strip())
    return m.group(1) if m else text.strip()


async def cmd_key_revoke(args: Args) -> int:
    """Revoke a key: gateways refuse it within seconds."""
    try:
        request = GatewayKeyRevokeRequest(id=_key_id(args.id))
    except ValidationError:
        raise InvalidArgument(
            f"{args.id!r} is not a gateway key id (24 hex characters, as gateway-key list "
            "shows them) nor a key"
        ) from None
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, GATEWAY_KEY_REVOKE, request, GatewayKeyRevokeReply)
    out.print(f"revoked gateway key {reply.id} of {reply.principal}")
    return 0


def commands() -> click.Group:
    """The ``gateway-key`` command group."""
    return group(
        "gateway-key",
        "issue, list and revoke the HTTP gateway's API keys",
        [
            online_command(
                "issue",
                cmd_key_issue,
                "issue an API key for PRINCIPAL (kind:name, e.g. user:alice), printed once",
                [
                    argument("principal"),
                    option(
                        "--roles",
                        default="",
                        help="comma-separated roles, which policy sees as the scopes of the "
                        "principal's calls",
                    ),
                    option("--ttl", default="90d", type=DURATION, help="how long the key works"),
                ],
            ),
            online_command(
                "list", cmd_key_list, "list the gateway keys and their state", [output_option()]
            ),
            online_command(
                "revoke",
                cmd_key_revoke,
                "revoke a gateway key by its id (or the key itself)",
                [argument("id", metavar="ID")],
            ),
        ],
    )
