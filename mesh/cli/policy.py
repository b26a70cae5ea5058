"""``mesh-policy``: the operator's tool.

Offline: ``init``, ``identity issue``, ``validate``, ``explain --file``. Online (as an identity
with the admin role, talking to the registry agent or reading the control plane's buckets):
``apply``, ``diff``, ``get``, ``history``, ``rollback``, ``explain``, ``agents``, ``call``,
``schemas``, ``identity token|list|revoke``, ``gateway-key issue|list|revoke``, ``audit
tail|verify``.

Connection settings come from options or ``MESH_SERVERS``, ``MESH_IDENTITY`` (default
``keys/admin``) and ``MESH_PREFIX``. The ``identity``, ``gateway-key`` and ``audit`` groups are
in their own modules; ``top`` and ``graph`` in ``observe``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from mesh import (
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    load_policy,
    parse_policy,
    save_identity,
)
from mesh.control_plane import (
    ADMIN_ROLE,
    REGISTRY,
    ROOT_KEY_FILE,
    ApplyReply,
    ApplyRequest,
    PolicyEngine,
    RollbackRequest,
    TrustRoot,
    diff_policies,
    parse_canonical,
    policy_text,
    save_trust_root,
)

from . import audit, check, dashboard, gateway_keys, identity, observe
from ._admin import admin_mesh, call_registry, connection_options, err, online_command, out, when
from ._agents import expiry_note, list_agents
from ._common import (
    DURATION,
    Args,
    argument,
    command,
    completion_command,
    configure_logging,
    group,
    option,
    version_option,
)
from ._common import main as run_main
from ._output import emit, iso, output_option
from ._schemas import schemas_command
from ._traffic import parse_meta, traffic_document, traffic_lines, uses_traffic

# --- offline commands -----------------------------------------------------------------------


def cmd_init(args: Args) -> int:
    """Create a trust root and an admin identity in DIR."""
    d = Path(args.dir)
    if (d / ROOT_KEY_FILE).exists() and not args.force:
        raise FailedPrecondition(
            f"{d / ROOT_KEY_FILE} already exists; refusing to replace a trust root (use --force)"
        )
    root = TrustRoot.generate()
    root.not_after = time.time() + args.root_ttl
    save_trust_root(root, d)
    ttl = args.ttl
    admin = root.issue_identity(args.admin, roles=[ADMIN_ROLE], ttl=ttl)
    save_identity(admin, d / args.admin)
    registry = root.issue_identity(REGISTRY, roles=[REGISTRY], ttl=ttl)
    save_identity(registry, d / REGISTRY)
    out.print(
        f"trust root {root.key_id}: {d / ROOT_KEY_FILE} (mode 0600) and {d / 'root.pub'}; "
        f"rotate before {when(root.not_after)}"
    )
    for name, ident in ((args.admin, admin), (REGISTRY, registry)):
        c = ident.certificate
        out.print(
            f"{name} identity (roles {list(c.roles)}, serial {c.serial}) in {d / name}, "
            f"valid until {when(c.not_after)}"
        )
    out.print("Keep root.key with the registry only; agents need root.pub.")
    return 0


def cmd_validate(args: Args) -> int:
    """Validate policy files; exit 1 naming the file, line and problem of each error. With
    ``--live``, also warn about names no live instance has (exit 1 for them with
    ``--strict``)."""
    failed = 0
    valid = []
    for path in args.paths:
        try:
            policy = load_policy(path)
        except MeshError as exc:
            failed += 1
            for e in getattr(exc, "errors", None) or [exc]:
                err.print(e.message, markup=False)
            continue
        valid.append((path, policy))
        spec = policy.spec
        out.print(
            f"{path}: OK ({policy.metadata.name}: {len(spec.rules)} rules, "
            f"{len(spec.endpoints)} endpoint settings, "
            + (f"{len(spec.routes)} routes, " if spec.routes else "")
            + f"default {spec.defaults.authorization})"
        )
    if args.live and valid:
        unknown, refused = asyncio.run(check.analyze_live(args, valid))
        failed += 1 if refused or (unknown and args.strict) else 0
    return 1 if failed else 0


# --- online commands ------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from exc


async def cmd_apply(args: Args) -> int:
    """Validate, then apply a policy as the next revision."""
    text = _read(args.path)
    policy = parse_policy(text, source=args.path, require_units=True)  # fail before connecting
    async with admin_mesh(args) as mesh:
        unknown, missing = check.unknown_names(args.path, policy, mesh.directory.all(), text)
        if missing and not args.allow_unknown_versions:
            check.print_refusals(missing)
            raise FailedPrecondition(
                f"{args.path}: not applied: {len(missing)} split backends or mirrors name "
                "versions or labels no live instance has: start such instances first, or "
                "apply with --allow-unknown-versions to route ahead of them"
            )
        if unknown and args.strict:
            check.print_warnings(unknown)
            raise FailedPrecondition(
                f"{args.path}: not applied: it names {len(unknown)} agents, endpoints or "
                "roles that no live instance has (--strict)"
            )
        unknown += missing  # allowed: warned of
        reply = await call_registry(
            mesh, "apply", ApplyRequest(policy=text, source=args.path), ApplyReply
        )
    check.print_warnings(unknown)  # after the registry accepted: a refusal comes first
    if reply.unchanged:
        out.print(f"unchanged: revision {reply.revision} already has this policy")
    else:
        out.print(f"applied revision {reply.revision}")
        for line in reply.changes:
            out.print(f"  {line}", markup=False)
    return 0


async def cmd_diff(args: Args) -> int:
    """Show what applying PATH would change; exit 1 if anything would, 0 if nothing would
    (like ``diff`` and ``git diff --exit-code``; errors exit 2)."""
    new = load_policy(args.path)
    async with admin_mesh(args) as mesh:
        current = mesh.governance.document  # what the newest signed head names
    old = parse_canonical(current.policy_json, current.source) if current else None
    lines = diff_policies(old, new)
    base = f"revision {current.revision}" if current else "no policy"
    out.print(f"{args.path} against {base}:")
    for line in lines or ["no changes"]:
        out.print(f"  {line}", markup=False)
    return 1 if lines else 0


async def cmd_get(args: Args) -> int:
    """Print the current revision (or an earlier one with --revision)."""
    async with admin_mesh(args) as mesh:
        if args.revision is None:
            found = mesh.governance.document  # what the newest signed head names
        else:
            kept = {r.revision: r for r in await mesh.control.policy_history()}
            found = kept.get(args.revision)
            if found is None:
                raise FailedPrecondition(f"revision {args.revision} is not in the kept history")
    if found is None:
        raise FailedPrecondition("no policy has been applied yet")
    rev = found
    if args.json or args.output == "json":
        print(rev.policy_json.decode())
        return 0
    text = policy_text(parse_canonical(rev.policy_json, source=rev.source))
    if args.output == "yaml":  # the policy alone: a file `apply` takes back
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    out.print(
        f"revision {rev.revision} from {rev.source}, applied by {rev.applied_by} at "
        f"{when(rev.applied_at)} (sha256 {rev.sha256[:16]}…)"
    )
    out.print(text.rstrip(), markup=False)
    return 0


async def cmd_history(args: Args) -> int:
    """List kept revisions."""
    async with admin_mesh(args) as mesh:
        revs = await mesh.control.policy_history()
    rows = [
        {
            "revision": rev.revision,
            "applied_at": iso(rev.applied_at),
            "applied_by": rev.applied_by,
            "source": rev.source,
            "sha256": rev.sha256,
            "rollback_of": rev.rollback_of,
        }
        for rev in revs
    ]

    def show() -> None:
        table = Table("revision", "applied", "by", "source", "sha256", "note")
        for rev in revs:
            note = f"rollback of {rev.rollback_of}" if rev.rollback_of else ""
            table.add_row(
                str(rev.revision),
                when(rev.applied_at),
                rev.applied_by,
                rev.source,
                rev.sha256[:12],
                note,
            )
        out.print(table)

    emit(args, rows, show)
    return 0


async def cmd_rollback(args: Args) -> int:
    """Apply an earlier revision again, as a new revision."""
    async with admin_mesh(args) as mesh:
        reply = await call_registry(
            mesh, "rollback", RollbackRequest(revision=args.revision), ApplyReply
        )
    out.print(f"revision {reply.revision} now runs the policy of revision {args.revision}")
    for line in reply.changes:
        out.print(f"  {line}", markup=False)
    return 0


async def cmd_explain(args: Args) -> int:
    """Print the decision for CALLER -> CALLEE.ENDPOINT and the rule, sending no request;
    with a policy that manages traffic, also the route that call's metadata selects and its
    destination's settings."""
    roles = tuple(r for r in (args.roles or "").split(",") if r)
    md: dict[str, str] = args.meta
    if args.file:
        engine = PolicyEngine(load_policy(args.file), source=args.file)
    else:
        async with admin_mesh(args) as mesh:
            current = mesh.governance.document
            if not roles:
                for rec in mesh.directory.all():
                    if rec.agent == args.caller:
                        roles = rec.certificate.roles
                        break
        if current is None:
            engine = PolicyEngine(None)
        else:
            rev = current
            engine = PolicyEngine(
                parse_canonical(rev.policy_json, rev.source),
                revision=rev.revision,
                source=rev.source,
            )
    chain = _explained_chain(args)
    route = engine.route(args.caller, roles, args.callee, args.endpoint, chain)
    decision = route.decision
    line = decision.explain(engine.source, engine.revision)
    if chain is not None:
        line += f" (on behalf of {chain[0]} via {' → '.join(chain[1])}, depth {chain[2]})"
    traffic = traffic_document(engine, route, args.caller, roles, args.endpoint, md)
    document = {
        "caller": args.caller,
        "roles": list(roles),
        "callee": args.callee,
        "endpoint": args.endpoint,
        "metadata": md,
        "delegation": None
        if chain is None
        else {
            "origin": chain[0],
            "path": list(chain[1]),
            "depth": chain[2],
            "scopes": list(chain[3]),
        },
        "decision": "ALLOW" if decision.allowed else "DENY",
        "rule": decision.rule,
        "effect": decision.effect,
        "audit_only": decision.audit_only,
        "source": engine.source,
        "revision": engine.revision,
        "explanation": line,
        "traffic": traffic,
    }

    def show() -> None:
        out.print(line, markup=False)
        if uses_traffic(engine.policy):
            for text in traffic_lines(traffic, f"{args.callee}.{args.endpoint}", md):
                out.print(text, markup=False)

    emit(args, document, show)
    return 0 if decision.allowed else 3


def _explained_chain(args: Args) -> tuple[str, tuple[str, ...], int, tuple[str, ...]] | None:
    """The delegation chain ``explain`` decides with: ``--origin``, ``--via`` (the agents the
    call came through, the caller last, added when missing) and ``--scope``; ``None`` when none
    is given (a direct call)."""
    via = tuple(a for a in (args.via or "").split(",") if a)
    scopes = tuple(args.scope or ())
    if args.origin is None and not via and not scopes:
        return None
    origin = args.origin or (via[0] if via else args.caller)
    if not via:  # an external origin came in through the caller (a gateway) itself
        via = (args.caller,) if origin == args.caller or ":" in origin else (origin,)
    if via[-1] != args.caller:
        via = (*via, args.caller)
    return origin, via, len(via), scopes


_STATUS_STYLE = {"ok": "", "revoked": "red", "refused": "red", "stale": "yellow"}


async def cmd_agents(args: Args) -> int:
    """Every live instance: version, certificate expiry, policy revision, staleness; an
    instance whose certificate is revoked shows as revoked (it is draining)."""
    async with admin_mesh(args) as mesh:
        found = await list_agents(mesh)
    rows = [row.document() for row in found]

    def show() -> None:
        table = Table(
            "agent", "instance", "version", "state", "certificate expires", "policy", "status"
        )
        for row in found:
            rec, status, detail = row.record, row.status, row.detail
            note = expiry_note(rec.certificate)
            shown = status
            if detail:  # as before: "refused: why", "stale: why", "stale (current is N)"
                shown += f": {detail}" if status != "stale" or rec.stale else f" ({detail})"
            style = _STATUS_STYLE[status]
            if row.ejected_by:
                shown += f"; ejected by {', '.join(row.ejected_by)}"
                style = style or "yellow"
            table.add_row(
                rec.agent,
                rec.instance,
                rec.version,
                "revoked" if status == "revoked" else rec.state,
                when(rec.certificate.not_after) + (f" [yellow]({note})[/]" if note else ""),
                str(rec.policy_revision) if rec.policy_revision is not None else "-",
                f"[{style}]{escape(shown)}[/]" if style else escape(shown),
            )
        out.print(table)

    emit(args, rows, show)
    return 0


def meta_option() -> click.Parameter:
    """``--meta KEY=VALUE`` (repeatable): request metadata, checked as a call checks it."""
    return option(
        "--meta",
        multiple=True,
        callback=parse_meta,
        metavar="KEY=VALUE",
        help="request metadata of the call, which selects its traffic route (repeatable)",
    )


def _call_body(text: str) -> str:
    """The body of ``call``, checked to be JSON before connecting."""
    try:
        json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    return text


async def cmd_call(args: Args) -> int:
    """Call an endpoint with a JSON body and print the JSON reply (exit 2 on an error); a
    streaming endpoint's chunks are printed one JSON line each, as they arrive."""
    body = _call_body(args.body)
    timeout = args.timeout
    async with admin_mesh(args) as mesh:
        await mesh.wait_for(args.agent, timeout=5)
        if any(
            (info := r.endpoints.get(args.endpoint)) is not None and info.streams
            for r in mesh.directory.instances(args.agent)
        ):
            stream = mesh.stream_json(
                args.agent, args.endpoint, body, timeout=timeout, metadata=args.meta
            )
            async for chunk in stream:
                print(json.dumps(chunk, ensure_ascii=False), flush=True)
            return 0
        reply = await mesh.request_json(
            args.agent,
            args.endpoint,
            body,
            timeout=timeout,
            idempotency_key=args.idempotency_key,
            metadata=args.meta,
        )
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    return 0


def cmd_top(args: Args) -> int:
    """Golden signals per agent and endpoint: rps, success rate, p50, p99, in flight; with
    ``--watch``, redrawn until Ctrl-C (which exits 0)."""
    try:
        return asyncio.run(observe.run_top(args))
    except KeyboardInterrupt:
        if args.watch is None:
            raise
        return 0


def cmd_dashboard(args: Args) -> int:
    """Serve the live dashboard until Ctrl-C, which exits 0."""
    try:
        return asyncio.run(dashboard.cmd_dashboard(args))
    except KeyboardInterrupt:
        return 0


async def cmd_graph(args: Args) -> int:
    """The caller -> callee graph (text, DOT, Mermaid, SVG or PNG)."""
    async with admin_mesh(args) as mesh:
        reply = await observe.fetch_signals(mesh, "server", True)
    out.print(observe.render_graph(reply, args.format, args.out), markup=False)
    return 0


# --- parser ---------------------------------------------------------------------------------


def _commands() -> list[click.Command]:
    revision = click.IntRange(min=1)
    return [
        command(
            "init",
            cmd_init,
            "create a trust root, an admin and a registry identity in DIR",
            [
                argument("dir"),
                option("--admin", default="admin", help="admin identity name"),
                option("--ttl", default="24h", type=DURATION, help="certificate lifetime"),
                option(
                    "--root-ttl",
                    default="3650d",
                    type=DURATION,
                    help="when to rotate the trust root",
                ),
                option("--force", is_flag=True, help="replace an existing trust root"),
            ],
        ),
        command(
            "validate",
            cmd_validate,
            "check policy files; name file, line and problem",
            [
                argument("paths", nargs=-1, required=True, metavar="PATH..."),
                option("--live", is_flag=True, help="warn of names no live instance has"),
                option("--strict", is_flag=True, help="with --live: exit 1 on such names"),
                *connection_options(),
            ],
        ),
        online_command(
            "apply",
            cmd_apply,
            "apply the policy file PATH as the next revision",
            [
                argument("path"),
                option(
                    "--strict", is_flag=True, help="refuse (exit 2) if it names anything not live"
                ),
                option(
                    "--allow-unknown-versions",
                    is_flag=True,
                    help="apply routes whose split or mirror names versions or labels no live "
                    "instance has yet (a rollout ahead of its instances); warned of, not refused",
                ),
            ],
        ),
        online_command(
            "diff",
            cmd_diff,
            "show what applying a policy file would change (exit 1 when it changes anything)",
            [argument("path")],
        ),
        online_command(
            "get",
            cmd_get,
            "print the current policy revision",
            [
                click.Option(
                    ["-o", "--output"],
                    type=click.Choice(["table", "json", "yaml"]),
                    default="table",
                    help="table (the revision's details, then the policy as YAML), yaml (the "
                    "policy alone: a file apply takes back) or json (the canonical JSON)",
                ),
                option("--json", is_flag=True, help="same as -o json"),
                option("--revision", type=revision, help="an earlier revision from the history"),
            ],
        ),
        online_command("history", cmd_history, "list the kept policy revisions", [output_option()]),
        online_command(
            "rollback",
            cmd_rollback,
            "apply an earlier revision again",
            [argument("revision", type=revision)],
        ),
        online_command(
            "explain",
            cmd_explain,
            "print the decision and its rule for CALLER calling CALLEE's ENDPOINT, and the "
            "traffic route and settings that apply, sending nothing (exit 0 ALLOW, 3 DENY)",
            [
                argument("caller"),
                argument("callee"),
                argument("endpoint"),
                option(
                    "--roles", help="caller roles [default: from a live instance's certificate]"
                ),
                option("--file", help="decide with this policy file instead of the current one"),
                meta_option(),
                option(
                    "--origin",
                    help="decide a call made on behalf of this origin (an agent, or kind:name "
                    "of an external principal) [default: a direct call]",
                ),
                option(
                    "--via",
                    metavar="AGENT,...",
                    help="the agents the call came through, origin's first (the caller is "
                    "added last); sets the depth",
                ),
                option("--scope", multiple=True, help="a scope the chain carries (repeatable)"),
                output_option(),
            ],
        ),
        online_command(
            "agents",
            cmd_agents,
            "list live instances and the policy revision each runs",
            [output_option()],
        ),
        online_command(
            "call",
            cmd_call,
            "call AGENT's ENDPOINT with the JSON BODY (default {}), print the reply",
            [
                argument("agent"),
                argument("endpoint"),
                argument("body", default="{}", required=False),
                option(
                    "--timeout",
                    type=DURATION,
                    help="e.g. 5s [default: the policy's, else the mesh's]",
                ),
                option("--idempotency-key", help="the callee runs the call at most once per key"),
                meta_option(),
            ],
        ),
        schemas_command(),
        command(
            "top",
            cmd_top,
            "golden signals per agent and endpoint (last minute)",
            [*observe.top_options(), *connection_options()],
        ),
        online_command(
            "graph",
            cmd_graph,
            "the caller -> callee graph: text, dot, mermaid, svg, png",
            observe.graph_options(),
        ),
        command(
            "dashboard",
            cmd_dashboard,
            "serve a live web page of the mesh: graph, signals, agents, denials, audit",
            [
                option(
                    "--listen",
                    default=dashboard.DEFAULT_LISTEN,
                    env="DASHBOARD_LISTEN",
                    help="HOST:PORT to serve on (a non-loopback host exposes it to the network)",
                ),
                option(
                    "--interval",
                    type=DURATION,
                    default="2s",
                    help="how often the page is updated",
                ),
                *connection_options(),
            ],
        ),
        identity.commands(),
        gateway_keys.commands(),
        check.commands(),
        audit.commands(),
        completion_command("mesh-policy"),
    ]


def cli() -> click.Group:
    """The ``mesh-policy`` command group."""
    grp = group(
        "mesh-policy",
        "Operate a mesh: trust root, identities, policies, agents and audit.",
        _commands(),
    )
    grp.params.append(version_option())
    return grp


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesh-policy``."""
    configure_logging("warning")  # library logs go to stderr, never into the output
    return run_main(cli(), "mesh-policy", argv)


if __name__ == "__main__":
    sys.exit(main())
