"""``mesh-policy identity``: issue identities offline; make join tokens, list and revoke
certificates through the registry."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

from ._admin import add_command, admin_mesh, call_registry, err, online, out, when
from ._common import parse_duration
from ._output import add_output_option, emit, iso

if TYPE_CHECKING:
    from ._admin import Subcommands

ROOT_WARNING_S = 90 * 24 * 3600


def cmd_identity_issue(args: argparse.Namespace) -> int:
    """Issue an identity (new keys and a certificate) for AGENT into --out."""
    root = load_trust_root(args.root)
    if not root.can_sign:
        raise InvalidArgument(f"{args.root}: holds only root.pub; issuing needs root.key")
    roles = [r for r in (args.roles or "").split(",") if r]
    identity = root.issue_identity(args.agent, roles=roles, ttl=parse_duration(args.ttl))
    save_identity(identity, Path(args.out))
    cert = identity.certificate
    out.print(
        f"identity {cert.agent}/{cert.instance} serial {cert.serial} roles {list(cert.roles)} "
        f"valid until {when(cert.not_after)} written to {args.out} (identity.key mode 0600)"
    )
    return 0


async def cmd_identity_token(args: argparse.Namespace) -> int:
    """Make a one-time join token (printed once; only its hash is stored)."""
    roles = [x for x in (args.roles or "").split(",") if x]
    async with admin_mesh(args) as mesh:
        reply = await call_registry(
            mesh,
            "token",
            TokenRequest(
                agent=args.agent,
                roles=roles,
                ttl=parse_duration(args.ttl),
                cert_ttl=parse_duration(args.cert_ttl),
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


async def cmd_identity_list(args: argparse.Namespace) -> int:
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


async def cmd_identity_revoke(args: argparse.Namespace) -> int:
    """Revoke a serial, or every current certificate of an agent."""
    async with admin_mesh(args) as mesh:
        reply = await call_registry(mesh, "revoke", RevokeRequest(target=args.target), RevokeReply)
    for serial in reply.revoked:
        out.print(f"revoked {serial}")
    return 0


def add_parser(sub: Subcommands, conn: argparse.ArgumentParser) -> None:
    """The ``identity`` command group; ``conn`` holds the connection options."""
    ident = sub.add_parser(
        "identity",
        help="manage identities",
        description="Issue, enrol, list and revoke identities.",
    )
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    issue = add_command(
        isub, "issue", cmd_identity_issue, "issue an identity offline (keys + certificate)"
    )
    issue.add_argument("agent", help="agent name")
    issue.add_argument("--roles", default="", help="comma-separated roles")
    issue.add_argument("--root", required=True, help="trust root directory or root.key file")
    issue.add_argument("--out", required=True, help="directory to write the identity into")
    issue.add_argument("--ttl", default="24h", help="certificate lifetime (default 24h)")
    tok = add_command(
        isub, "token", online(cmd_identity_token), "make a one-time join token for an agent", conn
    )
    tok.add_argument("agent")
    tok.add_argument("--roles", default="", help="comma-separated roles to grant")
    tok.add_argument("--ttl", default="1h", help="how long the token can be used (default 1h)")
    tok.add_argument("--cert-ttl", default="24h", help="lifetime of the certificate it gets")
    add_output_option(
        add_command(isub, "list", online(cmd_identity_list), "list issued certificates", conn)
    )
    rv = add_command(
        isub,
        "revoke",
        online(cmd_identity_revoke),
        "revoke a certificate serial, or all current certificates of an agent",
        conn,
    )
    rv.add_argument("target", metavar="SERIAL|AGENT")
