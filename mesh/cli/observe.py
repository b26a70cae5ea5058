"""``mesh-policy top`` and ``mesh-policy graph``: golden signals and the call graph, as the
registry collected them from every agent's signed reports over the last minute; ``top --watch``
redraws them until Ctrl-C."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table

from mesh import Mesh
from mesh.control_plane import REGISTRY, SignalsReply, SignalsRequest

from ._admin import admin_mesh, out
from ._common import Args, option
from ._output import emit, emit_item, iso, output_option
from .graph import to_dot, to_mermaid, to_png, to_svg, to_text, top_table

DEFAULT_WATCH_S = 2.0


async def fetch_signals(
    mesh: Mesh, reporter: Literal["server", "client"], by_caller: bool
) -> SignalsReply:
    """Ask the registry for its signal table."""
    await mesh.wait_for(REGISTRY, timeout=5)
    return await mesh.request(
        REGISTRY,
        "signals",
        SignalsRequest(reporter=reporter, by_caller=by_caller),
        SignalsReply,
        timeout=15,
    )


def render_top(reply: SignalsReply, *, client: bool = False) -> RenderableType:
    """The `top` table: per agent and endpoint, rps, success rate, p50, p99, in flight; then,
    when a caller reported any, its circuits that are not closed and the instances it ejected.

    Args:
        reply: the registry's signals.
        client: ``reply`` holds the callers' view (``top --client``); the caption says so.
    """
    cells = top_table(reply.rows)
    side = "client side" if client else "server side"
    table = Table(*cells[0], title=f"golden signals, last {reply.window_s:.0f} s ({side})")
    for row in cells[1:]:
        table.add_row(*row)
    if not reply.traffic:
        return table
    traffic = Table(
        "CALLER", "CIRCUIT / EJECTED", "STATE", title="circuits not closed, ejected instances"
    )
    for t in reply.traffic:
        state = t.state
        if t.seconds_left is not None:
            state += f" ({t.seconds_left:.0f} s left when reported)"
        traffic.add_row(t.caller, t.target, state)
    return Group(table, traffic)


def top_document(reply: SignalsReply, *, client: bool = False) -> dict[str, Any]:
    """``top -o json|yaml``: ``at`` (when fetched), ``window_s``, ``side`` (``server`` or
    ``client``) and ``rows``, one per callee endpoint in total (``caller`` ``*``) and per
    caller: ``callee``, ``endpoint``, ``caller``, ``rps``, ``success_rate`` (0..1 or
    ``null``), ``p50_ms``, ``p99_ms``, ``inflight``, ``requests``, ``errors``; ``traffic``:
    callers' circuits that are not closed and the instances they ejected (``caller``,
    ``kind`` ``circuit`` or ``ejection``, ``target``, ``state``, ``seconds_left``)."""
    return {
        "at": iso(time.time()),
        "window_s": reply.window_s,
        "side": "client" if client else "server",
        "rows": [row.model_dump() for row in reply.rows],
        "traffic": [t.model_dump() for t in reply.traffic],
    }


async def run_top(args: Args) -> int:
    """``top``: print the signals once, or with ``--watch`` every ``args.watch`` seconds until
    cancelled (Ctrl-C): redrawn in place on a terminal, else one table (or one JSON line, or
    one YAML document) after another."""
    reporter: Literal["server", "client"] = "client" if args.client else "server"

    async def fetch(mesh: Mesh) -> SignalsReply:
        return await fetch_signals(mesh, reporter, not args.totals)

    async with admin_mesh(args) as mesh:
        if args.watch is None:
            reply = await fetch(mesh)
            doc = top_document(reply, client=args.client)
            emit(args, doc, lambda: out.print(render_top(reply, client=args.client)))
            return 0
        if args.output == "table" and out.is_terminal:
            with Live(console=out, auto_refresh=False) as live:
                while True:
                    live.update(render_top(await fetch(mesh), client=args.client), refresh=True)
                    await asyncio.sleep(args.watch)
        while True:
            reply = await fetch(mesh)
            if args.output == "table":
                out.print(render_top(reply, client=args.client))
            else:
                emit_item(args, top_document(reply, client=args.client))
            await asyncio.sleep(args.watch)


def render_graph(reply: SignalsReply, fmt: str, out: str | None) -> str:
    """The call graph as text, DOT, Mermaid, SVG or PNG (PNG and SVG go to ``out``)."""
    edges, nodes = reply.edges, reply.nodes
    if fmt == "png":
        path = out or "mesh-graph.png"
        to_png(edges, path, nodes)
        return f"wrote {path}"
    text = {"text": to_text, "dot": to_dot, "mermaid": to_mermaid, "svg": to_svg}[fmt](edges, nodes)
    if out:
        Path(out).write_text(text)
        return f"wrote {out}"
    return text


def top_options() -> list[click.Parameter]:
    """The options of ``top``."""
    return [
        option("--client", is_flag=True, help="callers' view instead of callees'"),
        option("--totals", is_flag=True, help="one row per endpoint, no callers"),
        option(
            "--watch",
            type=click.FloatRange(min=0, min_open=True),
            is_flag=False,
            flag_value=DEFAULT_WATCH_S,
            metavar="SECONDS",
            help=f"redraw every SECONDS (--watch alone: {DEFAULT_WATCH_S:g}) until Ctrl-C; with "
            "-o json one JSON object a line, with -o yaml one YAML document each time",
        ),
        output_option(),
    ]


def graph_options() -> list[click.Parameter]:
    """The options of ``graph``."""
    return [
        option(
            "--format",
            type=click.Choice(["text", "dot", "mermaid", "svg", "png"]),
            default="text",
            help="what to print or write",
        ),
        option("--out", help="file to write [default: stdout; PNG: mesh-graph.png]"),
    ]
