"""``mesh-policy dashboard``: a local web page of the mesh, updated live.

One page (``dashboard.html``, shipped with the package: no build step, nothing from a CDN)
shows the call graph, the golden signals per edge, the agents with their policy revision and
freshness, recent denials and recent audit records. The server (starlette on uvicorn, the
``web`` extra) takes one snapshot every ``interval`` seconds through an admin mesh connection,
from the same sources as ``top``, ``graph``, ``agents`` and ``audit tail``, and serves it as
``GET /api/state`` (JSON) and ``GET /api/events`` (Server-Sent Events, one snapshot per
event). A part that cannot be read (the registry is down, say) leaves its section ``null``
and says why in ``error``; the next snapshot that succeeds clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from mesh import FailedPrecondition, InvalidArgument, Mesh, MeshError
from mesh._log import get_logger
from mesh.control_plane import REGISTRY, AuditRecord, verify_audit_chain

from ._admin import admin_mesh
from ._agents import expiry_note, list_agents
from ._output import iso
from .audit import audit_document
from .graph import to_svg
from .observe import fetch_signals

if TYPE_CHECKING:
    from starlette.applications import Starlette

DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_INTERVAL_S = 2.0
AUDIT_WINDOW = 200  # records kept (and verified) for the audit and denial panels
SHOWN = 25  # rows of each of those panels
READ_TIMEOUT_S = 5.0  # per part of a snapshot: a stuck broker or registry cannot stall it
DENIAL_KINDS = ("authz.denied", "authz.audit_only")
WEB_MISSING = "the dashboard needs starlette and uvicorn: pip install 'natsmesh[web]'"

SNAPSHOT_KEYS = (
    "at", "error", "policy", "window_s", "graph", "signals", "agents", "denials", "audit",
    "audit_problems",
)  # fmt: skip

log = get_logger(__name__)


# --- the snapshot -------------------------------------------------------------------------------


class AuditWindow:
    """The last ``size`` audit records, read incrementally and verified (signatures, and the
    links between the records in the window; ``mesh-policy audit verify`` checks the chain
    from its start and against the signed head)."""

    def __init__(self, size: int = AUDIT_WINDOW) -> None:
        self.size = size
        self._entries: list[tuple[int, bytes]] = []
        self._verified: tuple[tuple[int, int], list[AuditRecord], list[str]] | None = None

    async def refresh(self, mesh: Mesh) -> tuple[list[AuditRecord], list[str]]:
        """Read what was appended since the last call; return ``(records, problems)``."""
        stream = await mesh.control.audit_stream()
        last = await stream.last()
        if last is None:
            self._entries = []
            return [], []
        if self._entries and last[0] < self._entries[-1][0]:
            self._entries = []  # the stream was replaced: start again
        start = self._entries[-1][0] + 1 if self._entries else max(1, last[0] - self.size + 1)
        if start <= last[0]:
            self._entries = (self._entries + await stream.read(start))[-self.size :]
        if not self._entries:
            return [], []
        span = (self._entries[0][0], last[0])
        if self._verified is None or self._verified[0] != span:
            records, problems = verify_audit_chain(
                self._entries,
                mesh.trust_root.public_key,
                first_seq=span[0],
                last_seq=last[0],
            )
            self._verified = (span, records, problems)
        return self._verified[1], self._verified[2]


def _denial_row(rec: AuditRecord) -> dict[str, Any]:
    """A denial the callee reported (``subject`` is ``caller -> callee.endpoint``)."""
    d = rec.details
    callee = rec.actor.split("/", 1)[0]
    target = rec.subject.split(" -> ", 1)[-1]
    endpoint = target[len(callee) + 1 :] if target.startswith(callee + ".") else target
    return {
        "seq": rec.seq,
        "ts": iso(rec.ts),
        "kind": rec.kind,
        "caller": d.get("caller"),
        "caller_instance": d.get("caller_instance"),
        "callee": callee,
        "callee_instance": rec.actor.split("/", 1)[1] if "/" in rec.actor else None,
        "endpoint": endpoint,
        "rule": d.get("rule"),
        "revision": d.get("revision"),
        "audit_only": rec.kind == "authz.audit_only",
        "suppressed": d.get("suppressed", 0),
    }


async def _agents(mesh: Mesh) -> list[dict[str, Any]]:
    """Every listed instance, as ``mesh-policy agents -o json`` lists it, with freshness:
    ``certificate_note``, ``last_seen`` and ``age_s``."""
    now = time.time()
    return [
        {
            **row.document(),
            "certificate_note": expiry_note(row.record.certificate, now) or None,
            "last_seen": iso(row.record.ts),
            "age_s": round(max(0.0, now - row.record.ts), 1),
        }
        for row in await list_agents(mesh)
    ]


def _policy(mesh: Mesh) -> dict[str, Any] | None:
    head = mesh.governance.head
    if head is None:
        return None
    doc = mesh.governance.document
    named = doc is not None and doc.revision == head.policy_revision
    return {
        "revision": head.policy_revision,
        "source": doc.source if named and doc else None,
        "applied_by": doc.applied_by if named and doc else None,
        "applied_at": iso(doc.applied_at) if named and doc else None,
        "head_version": head.version,
        "head_expires": iso(head.expires_at),
        "stale": mesh.stale,
    }


async def _part(errors: list[str], what: str, read: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(read, READ_TIMEOUT_S)
    except TimeoutError:
        errors.append(f"{what}: no answer within {READ_TIMEOUT_S:g} s")
    except MeshError as exc:
        errors.append(f"{what}: {type(exc).__name__}: {exc.message}")
    return None


async def snapshot(mesh: Mesh, audit: AuditWindow) -> dict[str, Any]:
    """What the page shows, as plain data (the structure is in ``docs/observability.md``)."""
    errors: list[str] = []
    signals = None
    if not mesh.directory.instances(REGISTRY):
        errors.append("registry: no live instance (golden signals and the graph need it)")
    else:
        signals = await _part(errors, "registry", fetch_signals(mesh, "server", by_caller=True))
    agents = await _part(errors, "directory", _agents(mesh))
    audit_read = await _part(errors, "audit log", audit.refresh(mesh))
    records, problems = audit_read if audit_read is not None else (None, [])
    graph = None
    if signals is not None:
        graph = {
            "nodes": signals.nodes,
            "edges": [e.model_dump() for e in signals.edges],
            "svg": to_svg(signals.edges, signals.nodes) if signals.edges else None,
        }
    newest = list(reversed(records)) if records is not None else None
    return {
        "at": iso(time.time()),
        "error": "; ".join(errors) or None,
        "policy": _policy(mesh),
        "window_s": signals.window_s if signals else None,
        "graph": graph,
        "signals": [r.model_dump() for r in signals.rows] if signals else None,
        "agents": agents,
        "denials": None
        if newest is None
        else [_denial_row(r) for r in newest if r.kind in DENIAL_KINDS][:SHOWN],
        "audit": None if newest is None else [audit_document(r) for r in newest[:SHOWN]],
        "audit_problems": problems,
    }


class Snapshots:
    """The newest snapshot, taken every ``interval`` seconds by one task and shared by every
    page and request (so ten open tabs cost the registry what one does)."""

    def __init__(self, mesh: Mesh, interval: float) -> None:
        self._mesh = mesh
        self._interval = interval
        self._audit = AuditWindow()
        self._changed = asyncio.Condition()
        self._version = 0
        self._latest: dict[str, Any] | None = None
        self._closed = False

    async def run(self) -> None:
        """Take snapshots until cancelled."""
        while True:
            try:
                doc = await snapshot(self._mesh, self._audit)
            except Exception as exc:  # a page that stops updating would hide it: show it
                log.warning("mesh.dashboard_snapshot_failed", error_type=type(exc).__name__)
                doc = dict.fromkeys(SNAPSHOT_KEYS)
                doc.update(at=iso(time.time()), error=f"snapshot failed: {type(exc).__name__}")
                doc["audit_problems"] = []
            async with self._changed:
                self._latest, self._version = doc, self._version + 1
                self._changed.notify_all()
            await asyncio.sleep(self._interval)

    async def after(self, version: int) -> tuple[int, dict[str, Any]] | None:
        """The first snapshot newer than ``version``, waiting for it; ``None`` once closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._version > version)
            if self._closed or self._latest is None:
                return None
            return self._version, self._latest

    async def close(self) -> None:
        """End every event stream (the server is stopping)."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


# --- the web server -----------------------------------------------------------------------------


def _page() -> str:
    return resources.files("mesh.cli").joinpath("dashboard.html").read_text(encoding="utf-8")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(snapshots: Snapshots, host: str) -> Starlette:
    """The ASGI app: ``/``, ``/api/state`` and ``/api/events``.

    Bound to a loopback address, it answers only requests for a loopback host name, so a web
    page elsewhere cannot read it through DNS rebinding.

    Raises:
        FailedPrecondition: starlette is not installed.
    """
    try:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise FailedPrecondition(WEB_MISSING) from None

    page = _page()

    async def index(request: Request) -> Response:
        nonce = secrets.token_urlsafe(16)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        body = page.replace("<script>", f'<script nonce="{nonce}">').replace(
            "<style>", f'<style nonce="{nonce}">'
        )
        return HTMLResponse(body, headers={"Content-Security-Policy": csp})

    async def state(request: Request) -> Response:
        found = await snapshots.after(0)
        if found is None:
            return JSONResponse({"error": "the dashboard is stopping"}, status_code=503)
        return JSONResponse(found[1], headers={"Cache-Control": "no-store"})

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {2000}\n\n"
        version = 0
        while (found := await snapshots.after(version)) is not None:
            version, doc = found
            yield f"id: {version}\ndata: {json.dumps(doc, ensure_ascii=False)}\n\n"

    async def events(request: Request) -> Response:
        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    hosts = ["localhost", "127.0.0.1", "::1", host] if _is_loopback(host) else ["*"]
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/api/events", events),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
    )


async def serve_dashboard(
    mesh: Mesh,
    host: str,
    port: int,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    started: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard of ``mesh`` (an admin connection) until cancelled.

    Args:
        mesh: a started mesh connection with the admin role.
        host: the address to bind (``127.0.0.1`` keeps it to this host).
        port: the port (``0``: a free one).
        interval: seconds between snapshots (and events).
        started: called once with the page's URL (the real port) when it listens.

    Raises:
        FailedPrecondition: starlette or uvicorn is not installed, or the address cannot be
            bound.
    """
    from mesh.bridges.serving import serving

    if not interval > 0:
        raise InvalidArgument(f"the interval must be more than 0 seconds, not {interval:g}")
    snapshots = Snapshots(mesh, interval)
    taker = asyncio.create_task(snapshots.run())
    try:
        async with serving(
            build_app(snapshots, host), host, port, what="the dashboard server", missing=WEB_MISSING
        ) as (url, task):
            if started is not None:
                started(url + "/")
            await asyncio.shield(task)
    finally:
        taker.cancel()
        await snapshots.close()
        with contextlib.suppress(asyncio.CancelledError):
            await taker


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8470`` for IPv6; ``:8470`` is ``127.0.0.1:8470``).

    Raises:
        InvalidArgument: not of that form.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"--listen takes HOST:PORT, e.g. {DEFAULT_LISTEN}, not {text!r}")
    return host, int(port)


async def cmd_dashboard(args: Any) -> int:
    """Serve the dashboard at ``args.listen`` until Ctrl-C.

    Args:
        args: the connection options ``admin_mesh`` takes (``servers``, ``identity``,
            ``prefix``, ``replicas``), ``listen`` (``HOST:PORT``, default
            ``127.0.0.1:8470``) and ``interval`` (seconds between updates, default 2).

    Raises:
        FailedPrecondition: starlette or uvicorn is missing (``pip install 'natsmesh[web]'``),
            or the address is taken.
        InvalidArgument: a malformed ``listen``.
    """
    host, port = parse_listen(getattr(args, "listen", None) or DEFAULT_LISTEN)
    interval = float(getattr(args, "interval", None) or DEFAULT_INTERVAL_S)
    try:
        import starlette  # noqa: F401  (fail before connecting)
        import uvicorn  # noqa: F401
    except ImportError:
        raise FailedPrecondition(WEB_MISSING) from None

    def announce(url: str) -> None:
        print(f"dashboard: {url} (Ctrl-C to stop)", flush=True)

    async with admin_mesh(args) as mesh:
        await serve_dashboard(mesh, host, port, interval=interval, started=announce)
    return 0
