"""``mesh-policy identity``: issue identities offline; make join tokens, list and revoke
certificates through the registry."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from mesh import InvalidArgument, save_identity
from mesh.control_plane import (
    Empty,
    IdentityInfo,
    IdentityList,
    RevokeReply,
    RevokeRequest,
    TokenReply,
    TokenRequest,
    load_trust_root,
)

from ._admin import admin_mesh, call_registry, err, online_command, out, when
from ._common import DURATION, Args, argument, command, group, option
from ._output import emit, iso, output_option

ROOT_WARNING_S = 90 * 24 * 3600


def cmd_identity_issue(args: Args) -> int:
    """Issue an identity (new keys and a certificate) for AGENT into --out."""
    root = load_trust_root(args.root)
    if not root.can_sign:
        raise InvalidArgument(f"{args.root}: holds only root.pub; issuing needs root.key")
    roles = [r for r in (args.roles or "").split(",") if r]
    identity = root.issue_identity(args.agent, roles=roles, ttl=args.ttl)
    save_identity(identity, Path(args.out))
    cert = identity.certificate
    out.print(
        f"identity {cert.agent}/{cert.instance} serial {cert.serial} roles {list(cert.roles)} "
        f"valid until {when(cert.not_after)} written to {args.out} (identity.key mode 0600)"
    )
    return 0


async def cmd_identity_token(args: Args) -> int:
    """Make a one-time join token (printed once; only its hash is stored)."""
    roles = [x for x in (args.roles or "").split(",") if x]
    async with admin_mesh(args) as mesh:
        reply = await call_registry(
            mesh,
            "token",
            TokenRequest(
                agent=args.agent,
                roles=roles,
                ttl=args.ttl,
                cert_ttl=args.cert_ttl,
            ),
            TokenReply,
        )
    out.print(reply.token)
    err.print(f"one-time join token for {args.agent!r}, usable until {when(reply.expires_at)}:")
    err.print(f"  mesh-agent run MODULE:ATTR --token {reply.token} --identity DIR --root root.pub")
    return 0


def _identity_state(info: IdentityInfo, now: float) -> str:
    if info.revoked:
        return "revoked"
    if info.not_after <= now:
        return "expired"
    if info.not_after - now < 3600:
        return "expires soon"
    return "valid"


_STATE_STYLE = {"revoked": "red", "expires soon": "yellow"}


async def cmd_identity_list(args: Args) -> int:
    """Every certificate the registry issued."""
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, "identities", Empty(), IdentityList)
    now = time.time()
    left = None if reply.root_not_after is None else reply.root_not_after - now
    if left is not None and left < ROOT_WARNING_S:
        err.print(f"[yellow]warning:[/] the trust root expires in {left / 86400:.0f} days")
    document = {
        "trust_root": {"key_id": reply.root_key_id, "not_after": iso(reply.root_not_after)},
        "identities": [
            {
                "agent": i.agent,
                "instance": i.instance,
                "serial": i.serial,
                "roles": list(i.roles),
                "via": i.via,
                "issued_at": iso(i.issued_at),
                "expires": iso(i.not_after),
                "state": _identity_state(i, now),
            }
            for i in reply.identities
        ],
    }

    def show() -> None:
        if reply.root_not_after is not None and left is not None:
            note = "[bold red]ROTATE NOW[/]" if left < ROOT_WARNING_S else "ok"
            out.print(
                f"trust root {reply.root_key_id} valid until {when(reply.root_not_after)}: {note}"
            )
        table = Table("agent", "instance", "serial", "roles", "via", "expires", "state")
        for i in reply.identities:
            state = _identity_state(i, now)
            style = _STATE_STYLE.get(state)
            table.add_row(
                i.agent,
                i.instance,
                i.serial,
                ",".join(i.roles),
                i.via,
                when(i.not_after),
                f"[{style}]{state}[/]" if style else state,
            )
        out.print(table)

    emit(args, document, show)
    return 0


async def cmd_identity_revoke(args: Args) -> int:
    """Revoke a serial, or every current certificate of an agent."""
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, "revoke", RevokeRequest(target=args.target), RevokeReply)
    for serial in reply.revoked:
        out.print(f"revoked {serial}")
    return 0


def commands() -> click.Group:
    """The ``identity`` command group."""
    return group(
        "identity",
        "issue, enrol, list and revoke identities",
        [
            command(
                "issue",
                cmd_identity_issue,
                "issue an identity for AGENT offline (new keys and a certificate) into --out",
                [
                    argument("agent"),
                    option("--roles", default="", help="comma-separated roles"),
                    option("--root", required=True, help="trust root directory or root.key file"),
                    option("--out", required=True, help="directory to write the identity into"),
                    option("--ttl", default="24h", type=DURATION, help="certificate lifetime"),
                ],
            ),
            online_command(
                "token",
                cmd_identity_token,
                "make a one-time join token for AGENT (printed once; only its hash is stored)",
                [
                    argument("agent"),
                    option("--roles", default="", help="comma-separated roles to grant"),
                    option(
                        "--ttl", default="1h", type=DURATION, help="how long the token can be used"
                    ),
                    option(
                        "--cert-ttl",
                        default="24h",
                        type=DURATION,
                        help="lifetime of the certificate it gets",
                    ),
                ],
            ),
            online_command(
                "list", cmd_identity_list, "list issued certificates", [output_option()]
            ),
            online_command(
                "revoke",
                cmd_identity_revoke,
                "revoke a certificate serial, or all current certificates of an agent",
                [argument("target", metavar="SERIAL|AGENT")],
            ),
        ],
    )
