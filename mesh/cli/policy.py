"""``mesh-policy``: the operator's tool.

Offline: ``init``, ``identity issue``, ``validate``, ``explain --file``. Online (as an identity
with the admin role, talking to the registry agent or reading the control plane's buckets):
``apply``, ``diff``, ``get``, ``history``, ``rollback``, ``explain``, ``agents``,
``identity token|list|revoke``, ``audit tail|verify``.

Connection settings come from options or ``MESH_SERVERS``, ``MESH_IDENTITY`` (default
``keys/admin``) and ``MESH_PREFIX``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mesh._core.config import MeshConfig
from mesh._core.identity import (
    ROOT_KEY_FILE,
    Certificate,
    TrustRoot,
    load_identity,
    load_trust_root,
    save_identity,
    save_trust_root,
)
from mesh._core.policy import (
    PolicyEngine,
    diff_policies,
    load_policy,
    parse_canonical,
    parse_policy,
)
from mesh._runtime.control import AuditRecord, verify_audit_chain
from mesh._runtime.mesh import Mesh
from mesh.errors import FailedPrecondition, InvalidArgument, MeshError

from . import observe
from ._common import configure_logging, env_default, parse_duration, run_command

ADMIN_ROLE = "admin"
REGISTRY = "registry"
EXPIRY_WARNING_S = 7 * 24 * 3600
ROOT_WARNING_S = 90 * 24 * 3600
# Piped output keeps whole rows (serials, instance ids) so it can be cut and pasted.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _expiry_note(cert: Certificate, now: float | None = None) -> str:
    left = cert.not_after - (now or time.time())
    if left <= 0:
        return "EXPIRED"
    life = cert.not_after - cert.not_before
    if left < max(life * 0.1, 0) or left < 3600:
        return f"expires in {left / 60:.0f} min"
    return ""


def warn_if_expiring(cert: Certificate, what: str) -> None:
    """Warn on stderr when a certificate is within a week (or 10 % of its life) of expiry."""
    left = cert.not_after - time.time()
    if left <= 0:
        err.print(f"[bold red]warning:[/] {what} certificate {cert.serial} has EXPIRED")
    elif left < min(EXPIRY_WARNING_S, (cert.not_after - cert.not_before) * 0.1) or left < 3600:
        err.print(
            f"[yellow]warning:[/] {what} certificate {cert.serial} expires in "
            f"{left / 3600:.1f} h ({_when(cert.not_after)})"
        )


# --- offline commands -----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Create a trust root and an admin identity in DIR."""
    d = Path(args.dir)
    if (d / ROOT_KEY_FILE).exists() and not args.force:
        raise FailedPrecondition(
            f"{d / ROOT_KEY_FILE} already exists; refusing to replace a trust root (use --force)"
        )
    root = TrustRoot.generate()
    root.not_after = time.time() + parse_duration(args.root_ttl)
    save_trust_root(root, d)
    ttl = parse_duration(args.ttl)
    admin = root.issue_identity(args.admin, roles=[ADMIN_ROLE], ttl=ttl)
    save_identity(admin, d / args.admin)
    registry = root.issue_identity(REGISTRY, roles=[REGISTRY], ttl=ttl)
    save_identity(registry, d / REGISTRY)
    out.print(
        f"trust root {root.key_id}: {d / ROOT_KEY_FILE} (mode 0600) and {d / 'root.pub'}; "
        f"rotate before {_when(root.not_after)}"
    )
    for name, ident in ((args.admin, admin), (REGISTRY, registry)):
        c = ident.certificate
        out.print(
            f"{name} identity (roles {list(c.roles)}, serial {c.serial}) in {d / name}, "
            f"valid until {_when(c.not_after)}"
        )
    out.print("Keep root.key with the registry only; agents need root.pub.")
    return 0


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
        f"valid until {_when(cert.not_after)} written to {args.out} (identity.key mode 0600)"
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate policy files; exit 1 naming the file, line and problem of each error."""
    failed = 0
    for path in args.paths:
        try:
            policy = load_policy(path)
        except MeshError as exc:
            failed += 1
            for e in getattr(exc, "errors", None) or [exc]:
                err.print(e.message, markup=False)
            continue
        spec = policy.spec
        out.print(
            f"{path}: OK ({policy.metadata.name}: {len(spec.rules)} rules, "
            f"{len(spec.endpoints)} endpoint settings, default {spec.defaults.authorization})"
        )
    return 1 if failed else 0


# --- online commands ------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> MeshConfig:
    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    return MeshConfig(servers=servers, prefix=args.prefix)


@asynccontextmanager
async def _admin(args: argparse.Namespace) -> AsyncIterator[Mesh]:
    identity = load_identity(args.identity)
    warn_if_expiring(identity.certificate, "your")
    async with Mesh(identity, _config(args)) as mesh:
        yield mesh


async def _registry(mesh: Mesh, endpoint: str, body: Any, reply: Any) -> Any:
    await mesh.wait_for(REGISTRY, timeout=5)
    return await mesh.request(REGISTRY, endpoint, body, reply, timeout=15)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from exc


def _registry_models() -> Any:
    from mesh_agents import registry

    return registry


async def cmd_apply(args: argparse.Namespace) -> int:
    """Validate, then apply a policy as the next revision."""
    text = _read(args.path)
    parse_policy(text, source=args.path)  # fail before connecting
    r = _registry_models()
    async with _admin(args) as mesh:
        reply = await _registry(
            mesh, "apply", r.ApplyRequest(policy=text, source=args.path), r.ApplyReply
        )
    if reply.unchanged:
        out.print(f"unchanged: revision {reply.revision} already has this policy")
    else:
        out.print(f"applied revision {reply.revision}")
        for line in reply.changes:
            out.print(f"  {line}", markup=False)
    return 0


async def cmd_diff(args: argparse.Namespace) -> int:
    """Show what applying PATH would change."""
    new = load_policy(args.path)
    async with _admin(args) as mesh:
        current = await mesh.control.current_policy()
    old = parse_canonical(current[0].policy_json, current[0].source) if current else None
    lines = diff_policies(old, new)
    base = f"revision {current[0].revision}" if current else "no policy"
    out.print(f"{args.path} against {base}:")
    for line in lines or ["no changes"]:
        out.print(f"  {line}", markup=False)
    return 0


async def cmd_get(args: argparse.Namespace) -> int:
    """Print the current revision (or an earlier one with --revision)."""
    async with _admin(args) as mesh:
        if args.revision is None:
            current = await mesh.control.current_policy()
            found = current[0] if current else None
        else:
            kept = {r.revision: r for r in await mesh.control.policy_history()}
            found = kept.get(args.revision)
            if found is None:
                raise FailedPrecondition(f"revision {args.revision} is not in the kept history")
    if found is None:
        raise FailedPrecondition("no policy has been applied yet")
    rev = found
    if args.json:
        print(rev.policy_json.decode())
        return 0
    out.print(
        f"revision {rev.revision} from {rev.source}, applied by {rev.applied_by} at "
        f"{_when(rev.applied_at)} (sha256 {rev.sha256[:16]}…)"
    )
    import yaml

    out.print(yaml.safe_dump(json.loads(rev.policy_json), sort_keys=False).rstrip(), markup=False)
    return 0


async def cmd_history(args: argparse.Namespace) -> int:
    """List kept revisions."""
    async with _admin(args) as mesh:
        revs = await mesh.control.policy_history()
    table = Table("revision", "applied", "by", "source", "sha256", "note")
    for rev in revs:
        note = f"rollback of {rev.rollback_of}" if rev.rollback_of else ""
        table.add_row(
            str(rev.revision),
            _when(rev.applied_at),
            rev.applied_by,
            rev.source,
            rev.sha256[:12],
            note,
        )
    out.print(table)
    return 0


async def cmd_rollback(args: argparse.Namespace) -> int:
    """Apply an earlier revision again, as a new revision."""
    r = _registry_models()
    async with _admin(args) as mesh:
        reply = await _registry(
            mesh, "rollback", r.RollbackRequest(revision=args.revision), r.ApplyReply
        )
    out.print(f"revision {reply.revision} now runs the policy of revision {args.revision}")
    for line in reply.changes:
        out.print(f"  {line}", markup=False)
    return 0


async def cmd_explain(args: argparse.Namespace) -> int:
    """Print the decision for CALLER -> CALLEE.ENDPOINT and the rule, sending no request."""
    roles = tuple(r for r in (args.roles or "").split(",") if r)
    if args.file:
        engine = PolicyEngine(load_policy(args.file), source=args.file)
    else:
        async with _admin(args) as mesh:
            current = await mesh.control.current_policy()
            if not roles:
                for rec in mesh.directory.all():
                    if rec.agent == args.caller:
                        roles = rec.certificate.roles
                        break
        if current is None:
            engine = PolicyEngine(None)
        else:
            rev = current[0]
            engine = PolicyEngine(
                parse_canonical(rev.policy_json, rev.source),
                revision=rev.revision,
                source=rev.source,
            )
    decision = engine.decide(args.caller, roles, args.callee, args.endpoint)
    out.print(decision.explain(engine.source, engine.revision), markup=False)
    return 0 if decision.allowed else 3


async def cmd_agents(args: argparse.Namespace) -> int:
    """Every live instance: version, certificate expiry, policy revision, staleness."""
    async with _admin(args) as mesh:
        current = await mesh.control.current_policy()
        records = sorted(mesh.directory.all(), key=lambda r: (r.agent, r.instance))
    latest = current[0].revision if current else None
    table = Table(
        "agent", "instance", "version", "state", "certificate expires", "policy", "status"
    )
    for rec in records:
        cert = rec.certificate
        if rec.policy_error:
            status = f"[red]refused: {rec.policy_error}[/]"
        elif latest is not None and rec.policy_revision != latest:
            status = f"[yellow]stale (current is {latest})[/]"
        else:
            status = "ok"
        note = _expiry_note(cert)
        table.add_row(
            rec.agent,
            rec.instance,
            rec.version,
            rec.state,
            _when(cert.not_after) + (f" [yellow]({note})[/]" if note else ""),
            str(rec.policy_revision) if rec.policy_revision is not None else "-",
            status,
        )
    out.print(table)
    return 0


async def cmd_identity_token(args: argparse.Namespace) -> int:
    """Make a one-time join token (printed once; only its hash is stored)."""
    r = _registry_models()
    roles = [x for x in (args.roles or "").split(",") if x]
    async with _admin(args) as mesh:
        reply = await _registry(
            mesh,
            "token",
            r.TokenRequest(
                agent=args.agent,
                roles=roles,
                ttl=parse_duration(args.ttl),
                cert_ttl=parse_duration(args.cert_ttl),
            ),
            r.TokenReply,
        )
    out.print(reply.token)
    err.print(f"one-time join token for {args.agent!r}, usable until {_when(reply.expires_at)}:")
    err.print(f"  mesh-agent run MODULE:ATTR --token {reply.token} --identity DIR --root root.pub")
    return 0


async def cmd_identity_list(args: argparse.Namespace) -> int:
    """Every certificate the registry issued."""
    r = _registry_models()
    async with _admin(args) as mesh:
        reply = await _registry(mesh, "identities", r.Empty(), r.IdentityList)
    table = Table("agent", "instance", "serial", "roles", "via", "expires", "state")
    now = time.time()
    if reply.root_not_after is not None:
        left = reply.root_not_after - now
        note = "[bold red]ROTATE NOW[/]" if left < ROOT_WARNING_S else "ok"
        out.print(
            f"trust root {reply.root_key_id} valid until {_when(reply.root_not_after)}: {note}"
        )
        if left < ROOT_WARNING_S:
            err.print(f"[yellow]warning:[/] the trust root expires in {left / 86400:.0f} days")
    for i in reply.identities:
        if i.revoked:
            state = "[red]revoked[/]"
        elif i.not_after <= now:
            state = "expired"
        elif i.not_after - now < 3600:
            state = "[yellow]expires soon[/]"
        else:
            state = "valid"
        table.add_row(
            i.agent, i.instance, i.serial, ",".join(i.roles), i.via, _when(i.not_after), state
        )
    out.print(table)
    return 0


async def cmd_identity_revoke(args: argparse.Namespace) -> int:
    """Revoke a serial, or every current certificate of an agent."""
    r = _registry_models()
    async with _admin(args) as mesh:
        reply = await _registry(mesh, "revoke", r.RevokeRequest(target=args.target), r.RevokeReply)
    for serial in reply.revoked:
        out.print(f"revoked {serial}")
    return 0


def _audit_line(rec: AuditRecord) -> str:
    details = " ".join(f"{k}={v}" for k, v in rec.details.items() if v not in (None, [], ""))
    return f"{rec.seq:>6} {_when(rec.ts)} {rec.kind:<26} {rec.actor:<28} {rec.subject} {details}"


async def cmd_audit_tail(args: argparse.Namespace) -> int:
    """Print the last records; with -f, follow new ones (each verified)."""
    async with _admin(args) as mesh:
        records, problems = await mesh.control.read_audit()
        for rec in records[-args.lines :] if args.lines > 0 else []:
            out.print(_audit_line(rec), markup=False)
        for p in problems:
            err.print(f"[red]audit problem:[/] {p}")
        if not args.follow:
            return 1 if problems else 0
        stream = await mesh.control.audit_stream()
        last = await stream.last()
        tail: list[tuple[int, bytes]] = [last] if last else []
        async for seq, raw in stream.follow((last[0] + 1) if last else 1):
            tail = [*tail[-1:], (seq, raw)]
            recs, probs = verify_audit_chain(tail, mesh.trust_root.public_key, first_seq=tail[0][0])
            for p in probs:
                err.print(f"[red]audit problem:[/] {p}")
            if recs and recs[-1].seq == seq:
                out.print(_audit_line(recs[-1]), markup=False)
    return 0


async def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check every signature and link; exit 1 on any problem."""
    async with _admin(args) as mesh:
        records, problems = await mesh.control.read_audit()
    for p in problems:
        out.print(f"FAIL {p}", markup=False)
    if problems:
        out.print(f"audit log: {len(problems)} problem(s) in {len(records)} verified record(s)")
        return 1
    out.print(f"audit log OK: {len(records)} records, signatures and hash chain verified")
    return 0


async def cmd_top(args: argparse.Namespace) -> int:
    """Golden signals per agent and endpoint: rps, success rate, p50, p99, in flight."""
    async with _admin(args) as mesh:
        reply = await observe.fetch_signals(
            mesh, "client" if args.client else "server", not args.totals
        )
    out.print(observe.render_top(reply))
    return 0


async def cmd_graph(args: argparse.Namespace) -> int:
    """The caller -> callee graph (text, DOT, Mermaid, SVG or PNG)."""
    async with _admin(args) as mesh:
        reply = await observe.fetch_signals(mesh, "server", True)
    out.print(observe.render_graph(reply, args.format, args.out), markup=False)
    return 0


# --- parser ---------------------------------------------------------------------------------


def _online(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(fn(args))

    run.__doc__ = fn.__doc__
    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``mesh-policy`` argument parser."""
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument(
        "--servers",
        default=env_default("SERVERS", "nats://127.0.0.1:4222"),
        help="NATS URLs, comma-separated (MESH_SERVERS)",
    )
    conn.add_argument(
        "--identity",
        default=env_default("IDENTITY", "keys/admin"),
        help="admin identity directory (MESH_IDENTITY, default keys/admin)",
    )
    conn.add_argument(
        "--prefix", default=env_default("PREFIX", "mesh"), help="subject prefix (MESH_PREFIX)"
    )

    p = argparse.ArgumentParser(
        prog="mesh-policy",
        description="Operate a mesh: trust root, identities, policies, agents and audit.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help: str,
        online: bool = False,
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[conn] if online else []
        )
        sp.set_defaults(func=fn)
        return sp

    init = cmd("init", cmd_init, "create a trust root, an admin and a registry identity")
    init.add_argument("dir", help="directory for root.key, root.pub and the identities")
    init.add_argument("--admin", default="admin", help="admin identity name (default admin)")
    init.add_argument("--ttl", default="24h", help="certificate lifetime (default 24h)")
    init.add_argument(
        "--root-ttl", default="3650d", help="when to rotate the trust root (default 3650d)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing trust root")

    v = cmd("validate", cmd_validate, "check policy files; name file, line and problem")
    v.add_argument("paths", nargs="+", metavar="PATH")
    a = cmd("apply", _online(cmd_apply), "apply a policy file as the next revision", True)
    a.add_argument("path", metavar="PATH")
    d = cmd("diff", _online(cmd_diff), "show what applying a policy file would change", True)
    d.add_argument("path", metavar="PATH")
    g = cmd("get", _online(cmd_get), "print the current policy revision", True)
    g.add_argument("--json", action="store_true", help="the canonical JSON instead of YAML")
    g.add_argument("--revision", type=int, help="an earlier revision from the history")
    cmd("history", _online(cmd_history), "list the kept policy revisions", True)
    rb = cmd("rollback", _online(cmd_rollback), "apply an earlier revision again", True)
    rb.add_argument("revision", type=int)
    ex = cmd(
        "explain",
        _online(cmd_explain),
        "print the decision and its rule for a call, sending nothing (exit 0 ALLOW, 3 DENY)",
        True,
    )
    ex.add_argument("caller")
    ex.add_argument("callee")
    ex.add_argument("endpoint")
    ex.add_argument("--roles", help="caller roles (default: from a live instance's certificate)")
    ex.add_argument("--file", help="decide with this policy file instead of the current one")
    cmd(
        "agents", _online(cmd_agents), "list live instances and the policy revision each runs", True
    )
    observe.add_arguments(
        cmd("top", _online(cmd_top), "golden signals per agent and endpoint (last minute)", True),
        cmd(
            "graph",
            _online(cmd_graph),
            "the caller -> callee graph: text, dot, mermaid, svg, png",
            True,
        ),
    )

    ident = sub.add_parser(
        "identity",
        help="manage identities",
        description="Issue, enrol, list and revoke identities.",
    )
    isub = ident.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    issue = cmd(
        "issue", cmd_identity_issue, "issue an identity offline (keys + certificate)", parent=isub
    )
    issue.add_argument("agent", help="agent name")
    issue.add_argument("--roles", default="", help="comma-separated roles")
    issue.add_argument("--root", required=True, help="trust root directory or root.key file")
    issue.add_argument("--out", required=True, help="directory to write the identity into")
    issue.add_argument("--ttl", default="24h", help="certificate lifetime (default 24h)")
    tok = cmd(
        "token", _online(cmd_identity_token), "make a one-time join token for an agent", True, isub
    )
    tok.add_argument("agent")
    tok.add_argument("--roles", default="", help="comma-separated roles to grant")
    tok.add_argument("--ttl", default="1h", help="how long the token can be used (default 1h)")
    tok.add_argument("--cert-ttl", default="24h", help="lifetime of the certificate it gets")
    cmd("list", _online(cmd_identity_list), "list issued certificates", True, isub)
    rv = cmd(
        "revoke",
        _online(cmd_identity_revoke),
        "revoke a certificate serial, or all current certificates of an agent",
        True,
        isub,
    )
    rv.add_argument("target", metavar="SERIAL|AGENT")

    audit = sub.add_parser(
        "audit",
        help="read the audit log",
        description="Read and verify the hash-chained audit log.",
    )
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    tail = cmd("tail", _online(cmd_audit_tail), "print the last audit records", True, asub)
    tail.add_argument("-n", "--lines", type=int, default=20)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    cmd(
        "verify",
        _online(cmd_audit_verify),
        "verify every signature and the hash chain; exit 1 on a problem",
        True,
        asub,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesh-policy``."""
    args = build_parser().parse_args(argv)
    configure_logging("warning")  # library logs go to stderr, never into the output
    return int(run_command(lambda: args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
