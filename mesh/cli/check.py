"""``mesh-policy check``: is this mesh healthy? One line per check, in the spirit of
``linkerd check``; and the live analysis of policy files that ``validate --live`` and
``apply`` print (names that nothing live has).

The checks run in order, each ``PASS``, ``WARN`` or ``FAIL`` with what to do; a check whose
prerequisite failed is ``SKIP``. NATS and JetStream are checked with a bare transport before
joining the mesh, so a server that is down is a ``FAIL`` line, not an error; the stores are
looked at (never created) before anything that would create them. Exit status, like Nagios
plugins: 0 all passed, 1 a warning and no failure, 2 a failure (or the command could not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import click
from rich.markup import escape

from mesh import Identity, Mesh, MeshError, Policy, load_identity
from mesh._core.config import Timeouts
from mesh._core.names import audit_stream, directory_bucket, store_bucket
from mesh._core.policy import Finding, Inventory, analyze_policy, line_of
from mesh._core.records import InstanceRecord, decode_record
from mesh._transport.nats import NatsTransport, map_nats_errors
from mesh.control_plane import ADMIN_ROLE, REGISTRY, Empty, IdentityList
from mesh.errors import PermissionDenied, Unauthenticated

from ._admin import _config, admin_mesh, err, online_command, out, when
from ._agents import agent_status
from ._common import Args
from ._output import emit, output_option

Status = Literal["pass", "warn", "fail", "skip"]

CHECKS = (
    "NATS reachable",
    "JetStream enabled",
    "control-plane stores",
    "store replicas",
    "admin identity",
    "registry answering",
    "trust root matches",
    "certificate expiry",
    "trust-root expiry",
    "policy freshness",
    "agents on the current policy",
    "clock skew",
)
STORE_NAMES = ("policy", "revoked", "head")  # the registry creates these when it starts
LAZY_STORES = ("certs", "tokens")  # created by the first issued certificate / join token
CONNECT_TIMEOUT = 5.0
REGISTRY_TIMEOUT = 5.0
SKEW_WINDOW = 1.5  # seconds of directory heartbeats watched (agents beat every second)
SKEW_WARN = 1.0
SKEW_FAIL = Timeouts().max_future  # records dated further ahead are refused by every agent
DAY = 86400.0
ROOT_WARNING_S = 90 * DAY
START_REGISTRY = "start it: mesh-agent run mesh_agents.registry:registry"
_LABEL = {
    "pass": "[green]PASS[/]",
    "warn": "[yellow]WARN[/]",
    "fail": "[bold red]FAIL[/]",
    "skip": "[dim]SKIP[/]",
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of ``check``: its name, status, what was found and what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""


class Report:
    """The results so far, in order."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> None:
        self.results.append(CheckResult(name, status, detail, fix))

    def skip_rest(self, why: str) -> None:
        """Mark every check not run yet as skipped because of ``why``."""
        done = {r.name for r in self.results}
        for name in CHECKS:
            if name not in done:
                self.add(name, "skip", why)

    @property
    def exit_code(self) -> int:
        statuses = {r.status for r in self.results}
        return 2 if "fail" in statuses else 1 if "warn" in statuses else 0


def _left(seconds: float) -> str:
    """A span of time for people: ``3.2 h``, ``12 min``, ``40 s``, ``9 days``."""
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.0f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


# --- NATS, JetStream and the stores, with a bare transport --------------------------------


async def _check_broker(args: Args, report: Report) -> bool:
    """NATS, JetStream, the stores and their replicas; whether the mesh may be joined."""
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    transport = NatsTransport(servers, name="mesh-policy-check", connect_timeout=CONNECT_TIMEOUT)
    try:
        await transport.connect()
    except MeshError as exc:
        report.add("NATS reachable", "fail", exc.message)
        report.skip_rest("NATS is not reachable")
        return False
    try:
        return await _check_jetstream(transport, args.prefix, report)
    finally:
        await transport.close()


async def _check_jetstream(transport: NatsTransport, prefix: str, report: Report) -> bool:
    nc = transport.nc
    info: dict[str, Any] = nc._server_info  # nats-py keeps the server's INFO here
    url = nc.connected_url.geturl() if nc.connected_url is not None else "?"
    cluster = info.get("cluster")
    servers = len(set(info.get("connect_urls") or ())) if cluster else 1
    where = f"cluster {cluster!r} of {servers} servers" if cluster else "a single server"
    report.add(
        "NATS reachable",
        "pass",
        f"connected to {url} (nats-server {info.get('version', '?')}, {where})",
    )
    if not info.get("jetstream"):
        report.add(
            "JetStream enabled",
            "fail",
            f"JetStream is not enabled on {url}",
            "start nats-server with -js",
        )
        report.skip_rest("JetStream is not enabled")
        return False
    js = nc.jetstream(timeout=CONNECT_TIMEOUT)
    try:
        with map_nats_errors("reading the JetStream account", jetstream_off_at=url):
            account = await js.account_info()
    except MeshError as exc:
        report.add("JetStream enabled", "fail", exc.message, "check the account's JetStream limits")
        report.skip_rest("JetStream is not usable")
        return False
    report.add("JetStream enabled", "pass", f"the account has {account.streams} streams")

    stores = [(store_bucket(prefix, s), f"KV_{store_bucket(prefix, s)}") for s in STORE_NAMES]
    stores.append((directory_bucket(prefix), f"KV_{directory_bucket(prefix)}"))
    stores.append((audit_stream(prefix), audit_stream(prefix)))
    lazy = [(store_bucket(prefix, s), f"KV_{store_bucket(prefix, s)}") for s in LAZY_STORES]
    replicas: dict[str, int] = {}
    missing = []
    for name, stream in stores + lazy:
        if await transport.stream_id(stream) is None:
            missing.append(name)
            continue
        with map_nats_errors(f"looking up the JetStream stream {stream!r}"):
            found = await js.stream_info(stream)
        replicas[name] = found.config.num_replicas or 1
    not_yet = [name for name, _ in lazy if name in missing]
    missing = [name for name in missing if name not in not_yet]
    if missing:
        none = len(missing) == len(stores)
        report.add(
            "control-plane stores",
            "fail",
            (f"no control plane under prefix {prefix!r}" if none else "missing")
            + f": {', '.join(missing)}",
            f"{START_REGISTRY} (it creates them); check --prefix / MESH_PREFIX",
        )
        report.skip_rest("the control-plane stores are missing (check creates nothing)")
        return False
    counts = sorted(set(replicas.values()))
    later = f"; {', '.join(not_yet)} not created yet (no certificate or token issued)"
    report.add(
        "control-plane stores",
        "pass",
        f"{len(replicas)} present ({', '.join(f'R{n}' for n in counts)})"
        + (later if not_yet else ""),
    )
    single = sorted(n for n, r in replicas.items() if r < 3)
    if servers >= 3 and single:
        report.add(
            "store replicas",
            "warn",
            f"{', '.join(f'{n} (R{replicas[n]})' for n in single)} on a cluster of {servers} "
            "servers: one server's loss loses them",
            "a mesh process opening a store scales it up to R3 (restart the registry), or "
            "nats stream edit KV_<name> --replicas 3",
        )
    else:
        note = f"a cluster of {servers}" if cluster else "a single server"
        report.add("store replicas", "pass", f"R{counts[-1]} on {note}")
    return True


# --- as the admin, in the mesh -------------------------------------------------------------


def _check_identity(args: Args, report: Report) -> Identity | None:
    try:
        identity = load_identity(args.identity)
    except MeshError as exc:
        report.add("admin identity", "fail", exc.message, "give --identity DIR (MESH_IDENTITY)")
        report.skip_rest("no admin identity")
        return None
    cert = identity.certificate
    if ADMIN_ROLE not in cert.roles:
        report.add(
            "admin identity",
            "fail",
            f"{args.identity}: {cert.agent} has roles {list(cert.roles)}, not {ADMIN_ROLE!r}",
            "use an identity from mesh-policy init, or issue one with --roles admin",
        )
    else:
        report.add("admin identity", "pass", f"{args.identity}: {cert.agent}, serial {cert.serial}")
    return identity


async def _check_registry(mesh: Mesh, report: Report) -> IdentityList | None:
    start = time.monotonic()
    try:
        await mesh.wait_for(REGISTRY, timeout=2.0)
    except MeshError:
        report.add(
            "registry answering", "fail", "no registry instance in the directory", START_REGISTRY
        )
        return None
    try:
        reply = await mesh.request(
            REGISTRY, "identities", Empty(), IdentityList, timeout=REGISTRY_TIMEOUT
        )
    except PermissionDenied as exc:
        report.add("registry answering", "fail", exc.message, "use an identity with the admin role")
        return None
    except MeshError as exc:
        report.add(
            "registry answering",
            "fail",
            f"{type(exc).__name__}: {exc.message}",
            "check the registry's logs",
        )
        return None
    ms = (time.monotonic() - start) * 1000
    n = len(mesh.directory.instances(REGISTRY))
    report.add(
        "registry answering",
        "pass",
        f"identities answered in {ms:.0f} ms" + (f" ({n} instances)" if n > 1 else ""),
    )
    return reply


async def _check_root(mesh: Mesh, reply: IdentityList | None, report: Report) -> None:
    ours = mesh.trust_root.key_id
    if reply is not None and reply.root_key_id and reply.root_key_id != ours:
        report.add(
            "trust root matches",
            "fail",
            f"the registry's trust root is {reply.root_key_id}, your identity's {ours}",
            "use an identity issued by this mesh's root (--identity)",
        )
        return
    head = mesh.governance.head
    if head is not None:
        report.add("trust root matches", "pass", f"head v{head.version} is signed by root {ours}")
        return
    raw = await mesh.control.head_raw()
    if raw is None:
        report.add("trust root matches", "warn", "no signed head in the store yet", START_REGISTRY)
        return
    try:
        mesh.control.decode_head(raw)
    except Unauthenticated as exc:
        report.add(
            "trust root matches",
            "fail",
            f"{exc.message} (your root is {ours})",
            "check --identity: its root.pub must be the mesh's",
        )
        return
    except MeshError as exc:
        report.add("trust root matches", "fail", f"the stored head is refused: {exc.message}")
        return
    report.add(
        "trust root matches",
        "warn",
        f"the head verifies with root {ours} but was not accepted: {mesh.governance.stale}",
    )


def _expiring(left: float, life: float) -> bool:
    """Within 10 % of its life or a day of expiry, whichever is shorter (agents renew at
    half their life, so a certificate this close is one whose renewal is failing)."""
    return left < min(0.1 * life, DAY)


def _check_certificates(
    identity: Identity, records: Sequence[InstanceRecord], now: float, report: Report
) -> None:
    mine = identity.certificate
    left = mine.not_after - now
    if left <= 0:
        report.add(
            "certificate expiry",
            "fail",
            f"your certificate {mine.serial} expired at {when(mine.not_after)}",
            "issue a new admin identity (mesh-policy identity issue admin --roles admin ...)",
        )
        return
    warn = []
    if _expiring(left, mine.not_after - mine.not_before):
        warn.append(f"yours ({mine.serial}) in {_left(left)}")
    soonest: tuple[float, str] | None = None
    for rec in records:
        cert = rec.certificate
        rec_left = cert.not_after - now
        if _expiring(rec_left, cert.not_after - cert.not_before):
            warn.append(f"{rec.key} in {_left(rec_left)}")
        if soonest is None or rec_left < soonest[0]:
            soonest = (rec_left, rec.key)
    if warn:
        report.add(
            "certificate expiry",
            "warn",
            "expiring: " + ", ".join(warn),
            "agents renew at half their life: check the registry and those agents' logs "
            "(mesh.renewal_failed)",
        )
        return
    detail = f"yours valid until {when(mine.not_after)}"
    if soonest is not None:
        detail += f"; {len(records)} live, the soonest ({soonest[1]}) in {_left(soonest[0])}"
    report.add("certificate expiry", "pass", detail)


def _root_file_not_after(identity_dir: str, key_id: str) -> float | None:
    """``not_after`` from a ``root.json`` of this root beside or above the identity."""
    for d in (Path(identity_dir), Path(identity_dir).parent):
        try:
            meta = json.loads((d / "root.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("key_id") == key_id:
            value = meta.get("not_after")
            if isinstance(value, int | float):
                return float(value)
    return None


def _check_root_expiry(
    args: Args, mesh: Mesh, reply: IdentityList | None, now: float, report: Report
) -> None:
    key = mesh.trust_root.key_id
    not_after = reply.root_not_after if reply is not None else None
    source = "the registry"
    if not_after is None:
        not_after = _root_file_not_after(args.identity, key)
        source = "root.json"
    if not_after is None:
        report.add("trust-root expiry", "pass", f"root {key}: no rotation date recorded")
        return
    left = not_after - now
    if left <= 0:
        status: Status = "fail"
        detail = f"root {key} was due for rotation at {when(not_after)} ({source})"
    elif left < ROOT_WARNING_S:
        status = "warn"
        detail = f"root {key} is due for rotation in {_left(left)} ({when(not_after)})"
    else:
        report.add(
            "trust-root expiry", "pass", f"root {key} valid until {when(not_after)} ({source})"
        )
        return
    report.add(
        "trust-root expiry",
        status,
        detail,
        "rotate the trust root (docs/operations.md, Rotating the trust root)",
    )


def _check_policy(mesh: Mesh, now: float, report: Report) -> int | None:
    """The head's freshness; returns the revision it names."""
    head = mesh.governance.head
    if head is None:
        report.add("policy freshness", "warn", "no signed head: no policy runs", START_REGISTRY)
        return None
    stale = mesh.governance.stale
    if head.expired(now):
        report.add(
            "policy freshness",
            "fail",
            f"head v{head.version} expired {_left(now - head.expires_at)} ago",
            "the registry re-signs the head every few seconds: is it running?",
        )
    elif stale is not None:
        report.add("policy freshness", "fail", stale, "check the registry's logs")
    elif head.policy_revision is None:
        report.add(
            "policy freshness",
            "warn",
            f"head v{head.version} names no policy: every call is allowed",
            "mesh-policy apply FILE",
        )
    else:
        report.add(
            "policy freshness",
            "pass",
            f"head v{head.version} names revision {head.policy_revision}, "
            f"expires in {_left(head.expires_at - now)}",
        )
    return head.policy_revision


def _check_agents(records: Sequence[InstanceRecord], revision: int | None, report: Report) -> None:
    found = [(r, *agent_status(r, set(), revision)) for r in records]  # as `agents` says
    refusing = [f"{r.key}: {detail}" for r, status, detail in found if status == "refused"]
    stale = [f"{r.key}: {r.stale}" for r, status, _ in found if status == "stale" and r.stale]
    behind = [
        f"{r.key} runs {r.policy_revision if r.policy_revision is not None else 'none'}"
        for r, status, _ in found
        if status == "stale" and not r.stale
    ]
    if refusing:
        report.add(
            "agents on the current policy",
            "fail",
            "refusing the policy: " + "; ".join(refusing),
            "see mesh-policy agents and those agents' logs",
        )
    elif stale or behind:
        report.add(
            "agents on the current policy",
            "warn",
            "; ".join(stale + behind) + (f" (current is {revision})" if behind else ""),
            "a new revision takes a few seconds; if it persists see mesh-policy agents",
        )
    else:
        what = f"revision {revision}" if revision is not None else "no policy"
        report.add(
            "agents on the current policy", "pass", f"{len(records)} live instances on {what}"
        )


async def _clock_offsets(mesh: Mesh) -> dict[str, float]:
    """Each instance's clock offset from ours, estimated from its signed heartbeat times.

    A heartbeat that arrives while the watch runs is dated ``offset - delay`` from its
    arrival; the largest value over the window is the best estimate (the least delayed). A
    record already stored when the watch began also carries its age, so it shows only a
    clock that is ahead (its value is then a lower bound).
    """
    kv = await mesh.transport.key_value(mesh.bucket)
    best: dict[str, float] = {}
    live = False

    async def watch() -> None:
        nonlocal live
        async for item in kv.watch():
            if item is None:
                live = True
                continue
            key, raw = item
            if raw is None:
                continue
            try:
                rec = decode_record(raw, mesh.verifier)
            except MeshError:
                continue
            offset = rec.ts - time.time()
            if live or offset > 0:
                best[key] = max(best.get(key, offset), offset)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watch(), SKEW_WINDOW)
    return best


def _check_skew(offsets: dict[str, float], report: Report) -> None:
    if not offsets:
        report.add("clock skew", "pass", f"no heartbeat heard in {SKEW_WINDOW:g} s to compare")
        return
    far = {k: v for k, v in offsets.items() if abs(v) > SKEW_WARN}
    if not far:
        worst = max(offsets.values(), key=abs)
        report.add(
            "clock skew",
            "pass",
            f"{len(offsets)} instances within {abs(worst):.2f} s of this clock",
        )
        return
    status: Status = "fail" if any(abs(v) > SKEW_FAIL for v in far.values()) else "warn"
    listed = ", ".join(
        f"{k} {v:+.1f} s" for k, v in sorted(far.items(), key=lambda kv: -abs(kv[1]))
    )
    report.add(
        "clock skew",
        status,
        listed + f" (beyond {SKEW_FAIL:g} s ahead, records and messages are refused)",
        "run NTP (chrony, systemd-timesyncd) on those hosts and here",
    )


async def run_checks(args: Args) -> Report:
    """Every check, in order (``CHECKS``)."""
    report = Report()
    if not await _check_broker(args, report):
        return report
    identity = _check_identity(args, report)
    if identity is None:
        return report
    try:
        async with Mesh(identity, _config(args)) as mesh:
            reply = await _check_registry(mesh, report)
            await _check_root(mesh, reply, report)
            now = time.time()
            records = sorted(mesh.directory.all(), key=lambda r: r.key)
            _check_certificates(identity, records, now, report)
            _check_root_expiry(args, mesh, reply, now, report)
            revision = _check_policy(mesh, now, report)
            _check_agents(records, revision, report)
            _check_skew(await _clock_offsets(mesh), report)
    except MeshError as exc:
        done = {r.name for r in report.results}
        name = next(n for n in CHECKS if n not in done)
        report.add(name, "fail", f"{type(exc).__name__}: {exc.message}")
        report.skip_rest(f"{name} failed")
    return report


def render(report: Report) -> None:
    """One line per check and a summary."""
    for r in report.results:
        line = f"{_LABEL[r.status]}  {escape(r.name)}: {escape(r.detail)}"
        if r.fix:
            line += f" [dim]→ {escape(r.fix)}[/]"
        out.print(line)
    counts = {s: sum(1 for r in report.results if r.status == s) for s in _LABEL}
    out.print(
        f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed, "
        f"{counts['skip']} skipped"
    )


async def cmd_check(args: Args) -> int:
    """Check the mesh's health: one line per check (exit 0 all pass, 1 a warning, 2 a
    failure)."""
    report = await run_checks(args)
    document = {"checks": [asdict(r) for r in report.results], "exit_code": report.exit_code}
    emit(args, document, lambda: render(report))
    return report.exit_code


# --- names in policy files that nothing live has --------------------------------------------


def unknown_names(
    path: str, policy: Policy, records: Iterable[InstanceRecord], text: str | None = None
) -> tuple[list[str], list[str]]:
    """The names ``policy`` uses that no live instance has, as lines ``path[:line]: ...``:
    ``(warnings, refusals)``, the refusals being split backends and mirrors no live instance
    is in (``Finding.blocking``), with the line of the file ``text`` where known."""
    findings: list[Finding] = analyze_policy(policy, Inventory.of(records))
    warnings: list[str] = []
    refusals: list[str] = []
    for f in findings:
        line = line_of(text, f.loc) if text is not None and f.loc else None
        where = f"{path}:{line}" if line is not None else path
        (refusals if f.blocking else warnings).append(f"{where}: {f.message}")
    return warnings, refusals


def print_warnings(lines: Iterable[str]) -> None:
    for line in lines:
        err.print(f"[yellow]warning:[/] {escape(line)}")


def print_refusals(lines: Iterable[str]) -> None:
    for line in lines:
        err.print(f"[red]error:[/] {escape(line)}")


def warn_unknown_names(
    path: str, policy: Policy, records: Iterable[InstanceRecord]
) -> tuple[int, int]:
    """Print to stderr a warning for each name ``policy`` uses that no live instance has, and
    an error for each split backend or mirror no live instance is in; returns how many of
    each."""
    try:
        text: str | None = Path(path).read_text()
    except OSError:
        text = None
    warnings, refusals = unknown_names(path, policy, records, text)
    print_refusals(refusals)
    print_warnings(warnings)
    return len(warnings), len(refusals)


async def analyze_live(args: Args, policies: Sequence[tuple[str, Policy]]) -> tuple[int, int]:
    """``warn_unknown_names`` for each policy, against the live directory; returns the
    totals of warnings and of refusals."""
    async with admin_mesh(args) as mesh:
        records = mesh.directory.all()
    counts = [warn_unknown_names(path, policy, records) for path, policy in policies]
    return sum(w for w, _ in counts), sum(r for _, r in counts)


def commands() -> click.Command:
    """The ``check`` command."""
    return online_command(
        "check",
        cmd_check,
        "check the mesh's health: NATS, stores, registry, roots, certificates, policy, clocks",
        [output_option(aliases={"text": "table"})],  # `text` was the name of `table`
    )
