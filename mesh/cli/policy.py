"""``mesh-policy``: the operator's tool. Offline identity commands for now: ``init`` and
``identity issue``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import FailedPrecondition, InvalidArgument
from ..identity import (
    ROOT_KEY_FILE,
    TrustRoot,
    load_trust_root,
    save_identity,
    save_trust_root,
)
from ._common import parse_duration, run_command

ADMIN_ROLE = "admin"


def _expiry(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def cmd_init(args: argparse.Namespace) -> int:
    """Create a trust root and an admin identity in DIR."""
    d = Path(args.dir)
    if (d / ROOT_KEY_FILE).exists() and not args.force:
        raise FailedPrecondition(
            f"{d / ROOT_KEY_FILE} already exists; refusing to replace a trust root (use --force)"
        )
    root = TrustRoot.generate()
    save_trust_root(root, d)
    admin = root.issue_identity(args.admin, roles=[ADMIN_ROLE], ttl=parse_duration(args.ttl))
    save_identity(admin, d / args.admin)
    print(f"trust root {root.key_id} written to {d / ROOT_KEY_FILE} (mode 0600) and {d}/root.pub")
    print(
        f"admin identity {args.admin!r} (role admin, serial {admin.certificate.serial}) "
        f"written to {d / args.admin}, valid until {_expiry(admin.certificate.not_after)}"
    )
    print("Keep root.key offline; agents need only root.pub.")
    return 0


def cmd_identity_issue(args: argparse.Namespace) -> int:
    """Issue an identity (new keys and a certificate) for AGENT into --out."""
    root = load_trust_root(args.root)
    if not root.can_sign:
        raise InvalidArgument(f"{args.root}: holds only root.pub; issuing needs root.key")
    roles = [r for r in (args.roles or "").split(",") if r]
    identity = root.issue_identity(args.agent, roles=roles, ttl=parse_duration(args.ttl))
    out = Path(args.out)
    save_identity(identity, out)
    cert = identity.certificate
    print(
        f"identity {cert.agent}/{cert.instance} serial {cert.serial} roles {list(cert.roles)} "
        f"valid until {_expiry(cert.not_after)} written to {out} (identity.key mode 0600)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``mesh-policy`` argument parser."""
    p = argparse.ArgumentParser(
        prog="mesh-policy",
        description="Operate a mesh: trust root and identities.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a trust root and an admin identity")
    init.add_argument("dir", help="directory for root.key, root.pub and the admin identity")
    init.add_argument("--admin", default="admin", help="admin identity name (default admin)")
    init.add_argument("--ttl", default="24h", help="admin certificate lifetime (default 24h)")
    init.add_argument("--force", action="store_true", help="replace an existing trust root")
    init.set_defaults(func=cmd_init)

    ident = sub.add_parser("identity", help="manage identities")
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    issue = isub.add_parser("issue", help="issue an identity offline (keys + certificate)")
    issue.add_argument("agent", help="agent name")
    issue.add_argument("--roles", default="", help="comma-separated roles")
    issue.add_argument("--root", required=True, help="trust root directory or root.key file")
    issue.add_argument("--out", required=True, help="directory to write the identity into")
    issue.add_argument("--ttl", default="24h", help="certificate lifetime (default 24h)")
    issue.set_defaults(func=cmd_identity_issue)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesh-policy``."""
    args = build_parser().parse_args(argv)
    result = run_command(lambda: args.func(args))
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
