"""``mesh-policy top`` and ``mesh-policy graph``: golden signals and the call graph, as the
registry collected them from every agent's signed reports over the last minute."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from rich.table import Table

from mesh import Mesh
from mesh.control_plane import REGISTRY, SignalsReply, SignalsRequest

from .graph import to_dot, to_mermaid, to_png, to_svg, to_text, top_table


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


def render_top(reply: SignalsReply, *, client: bool = False) -> Table:
    """The `top` table: per agent and endpoint, rps, success rate, p50, p99, in flight.

    Args:
        reply: the registry's signals.
        client: ``reply`` holds the callers' view (``top --client``); the caption says so.
    """
    cells = top_table(reply.rows)
    side = "client side" if client else "server side"
    table = Table(*cells[0], title=f"golden signals, last {reply.window_s:.0f} s ({side})")
    for row in cells[1:]:
        table.add_row(*row)
    return table


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


def add_arguments(top: argparse.ArgumentParser, graph: argparse.ArgumentParser) -> None:
    """Options of the two commands."""
    top.add_argument("--client", action="store_true", help="callers' view instead of callees'")
    top.add_argument("--totals", action="store_true", help="one row per endpoint, no callers")
    graph.add_argument("--format", choices=["text", "dot", "mermaid", "svg", "png"], default="text")
    graph.add_argument("--out", help="file to write (default: stdout; PNG: mesh-graph.png)")
