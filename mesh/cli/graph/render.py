"""The renderers: the graph as text, DOT, Mermaid, SVG and PNG, and the ``top`` table.

Every renderer returns a string (``to_png`` alone writes a file, and needs the optional
matplotlib). ``to_svg`` and ``to_png`` draw the picture ``layout`` places.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

from mesh._core.signals import ALL_CALLERS, GraphEdge, SignalRow
from mesh.errors import FailedPrecondition

from .layout import (
    EDGE_COLORS,
    LABEL_CHAR_W,
    LABEL_FONT_PX,
    NODE_H,
    Point,
    Route,
    edge_label,
    edge_widths,
    fmt_pct,
    fmt_rps,
    layout,
    nodes_of,
    rank,
    severity,
    short_name,
)

__all__ = ["TOP_HEADER", "to_dot", "to_mermaid", "to_png", "to_svg", "to_text", "top_table"]

TOP_HEADER = ["AGENT", "ENDPOINT", "RPS", "SUCCESS", "P50", "P99", "INFLIGHT"]

# Drawing, in px (SVG user units; the PNG uses 100 dpi, so the same numbers).
FONT_PX = 13.0
FONT_FAMILY = "Helvetica, Arial, sans-serif"
NODE_FILL = "#f7fafc"
NODE_STROKE = "#2b6cb0"
TEXT_COLOR = "#1a202c"


# --- formatting ---------------------------------------------------------------------------------


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


# --- top ----------------------------------------------------------------------------------------


def top_table(rows: Sequence[SignalRow]) -> list[list[str]]:
    """Formatted cells for ``mesh-policy top``, header row first.

    A per-caller row (``caller != "*"``) that follows its endpoint's row shows ``← caller`` in
    the ENDPOINT column under it; on its own it shows ``endpoint ← caller`` beside its agent.
    """
    table = [list(TOP_HEADER)]
    prev: tuple[str, str] | None = None
    for r in rows:
        here = (r.callee, r.endpoint)
        if r.caller == ALL_CALLERS:
            agent, endpoint = r.callee, r.endpoint
        elif prev == here:
            agent, endpoint = "", f"  ← {r.caller}"
        else:
            agent, endpoint = r.callee, f"{r.endpoint} ← {r.caller}"
        prev = here
        success = "-" if r.success_rate is None else fmt_pct(r.success_rate)
        table.append(
            [
                agent,
                endpoint,
                fmt_rps(r.rps),
                success,
                _fmt_ms(r.p50_ms),
                _fmt_ms(r.p99_ms),
                str(r.inflight),
            ]
        )
    return table


# --- text, DOT, Mermaid -------------------------------------------------------------------------


def to_text(edges: Sequence[GraphEdge], nodes: Iterable[str] = ()) -> str:
    """An adjacency list for the terminal: each caller, then its callees with rps, success rate
    and p99, callers in layer order (the agents nobody calls first). ``nodes`` adds agents
    that may have no traffic."""
    names = nodes_of(edges, nodes)
    if not names:
        return "(no calls in the window)\n"
    ranked = rank(edges, names)
    order = sorted(names, key=lambda n: (ranked.layer[n], ranked.order[n], n))
    out_edges: dict[str, list[GraphEdge]] = {}
    has_in: set[str] = set()
    for e in edges:
        out_edges.setdefault(e.caller, []).append(e)
        if e.caller != e.callee:
            has_in.add(e.callee)
    width = max(len(e.callee) for e in edges) if edges else 0
    lines: list[str] = []
    for name in order:
        outs = sorted(out_edges.get(name, []), key=lambda e: e.callee)
        if not outs:
            if name not in has_in:
                lines.append(f"{name}  (no calls)")
            continue
        lines.append(name)
        for i, e in enumerate(outs):
            branch = "└──" if i == len(outs) - 1 else "├──"
            success = "-" if e.success_rate is None else fmt_pct(e.success_rate)
            lines.append(
                f"{branch} {e.callee:<{width}}  {fmt_rps(e.rps):>7} rps  {success:>7}"
                f"  p99 {_fmt_ms(e.p99_ms)}"
            )
    return "\n".join(lines) + "\n"


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def to_dot(edges: Sequence[GraphEdge], nodes: Iterable[str] = ()) -> str:
    """Graphviz DOT (left to right), edges labelled ``"12.3 rps, 99.5 %"`` and coloured by
    success rate."""
    lines = [
        "digraph mesh {",
        "  rankdir=LR;",
        f'  node [shape=box, style="rounded,filled", fillcolor="{NODE_FILL}", '
        f'color="{NODE_STROKE}", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    lines += [f"  {_dot_id(n)};" for n in nodes_of(edges, nodes)]
    widths = edge_widths(edges)
    for e, w in zip(edges, widths, strict=True):
        lines.append(
            f"  {_dot_id(e.caller)} -> {_dot_id(e.callee)} [label={_dot_id(edge_label(e))}, "
            f'color="{EDGE_COLORS[severity(e)]}", penwidth={w:.1f}];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


_MERMAID_RESERVED = {
    "end",
    "graph",
    "flowchart",
    "subgraph",
    "style",
    "class",
    "classdef",
    "click",
    "linkstyle",
    "direction",
    "default",
}


def _mermaid_ids(names: Sequence[str]) -> dict[str, str]:
    ids: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
        if not base or not base[0].isalpha() or base.lower() in _MERMAID_RESERVED:
            base = "n_" + base
        candidate, i = base, 2
        while candidate in used:
            candidate, i = f"{base}_{i}", i + 1
        used.add(candidate)
        ids[name] = candidate
    return ids


def _mermaid_text(text: str) -> str:
    return '"' + escape(text).replace('"', "#quot;") + '"'


def to_mermaid(edges: Sequence[GraphEdge], nodes: Iterable[str] = ()) -> str:
    """A Mermaid ``flowchart LR`` with labelled edges (renders in GitHub Markdown)."""
    names = nodes_of(edges, nodes)
    ids = _mermaid_ids(names)
    lines = ["flowchart LR"]
    lines += [f"    {ids[n]}[{_mermaid_text(n)}]" for n in names]
    for e in edges:
        lines.append(f"    {ids[e.caller]} -->|{_mermaid_text(edge_label(e))}| {ids[e.callee]}")
    failing = [i for i, e in enumerate(edges) if severity(e)]
    for i in failing:
        lines.append(f"    linkStyle {i} stroke:{EDGE_COLORS[severity(edges[i])]}")
    return "\n".join(lines) + "\n"


# --- SVG ----------------------------------------------------------------------------------------


def _path_d(route: Route) -> str:
    parts = [f"M{route.start[0]:.1f},{route.start[1]:.1f}"]
    for seg in route.segments:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
        parts.append(("C" if len(seg) == 3 else "L") + pts)
    return " ".join(parts)


def to_svg(edges: Sequence[GraphEdge], nodes: Iterable[str] = ()) -> str:
    """A self-contained SVG picture of the graph (no Graphviz): rounded boxes for agents,
    arrows labelled with rps and success rate, coloured by success rate, thicker when busier."""
    lay = layout(edges, nodes)
    w, h, nw = lay.width, lay.height, lay.node_w
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family={quoteattr(FONT_FAMILY)}>',
        "<title>Agent dependency graph</title>",
        "<defs>",
    ]
    for i, color in enumerate(EDGE_COLORS):
        out.append(
            f'<marker id="arrow{i}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="10" '
            f'markerHeight="10" markerUnits="userSpaceOnUse" orient="auto">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        )
    out.append("</defs>")
    out.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    out.append('<g class="edges" fill="none">')
    for r in lay.routes:
        e = r.edge
        title = f"{e.caller} → {e.callee}: {r.label}, p99 {_fmt_ms(e.p99_ms)}"
        out.append(
            f'<path class="edge" d="{_path_d(r)}" stroke="{r.color}" '
            f'stroke-width="{r.width:.1f}" marker-end="url(#arrow{EDGE_COLORS.index(r.color)})">'
            f"<title>{escape(title)}</title></path>"
        )
    out.append("</g>")
    out.append('<g class="nodes">')
    for name, (x, y) in sorted(lay.boxes.items()):
        out.append(
            f'<g class="node"><title>{escape(name)}</title>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{nw:.1f}" height="{NODE_H:.0f}" rx="8" '
            f'fill="{NODE_FILL}" stroke="{NODE_STROKE}" stroke-width="1.5"/>'
            f'<text x="{x + nw / 2:.1f}" y="{y + NODE_H / 2 + FONT_PX * 0.35:.1f}" '
            f'text-anchor="middle" font-size="{FONT_PX:.0f}" fill="{TEXT_COLOR}">'
            f"{escape(short_name(name))}</text></g>"
        )
    out.append("</g>")
    out.append('<g class="labels">')
    for r in lay.routes:
        x, y = r.label_at
        lw = len(r.label) * LABEL_CHAR_W + 10
        out.append(
            f'<rect x="{x - lw / 2:.1f}" y="{y - LABEL_FONT_PX * 0.7:.1f}" width="{lw:.1f}" '
            f'height="{LABEL_FONT_PX * 1.4:.1f}" rx="3" fill="white" fill-opacity="0.9"/>'
            f'<text x="{x:.1f}" y="{y + LABEL_FONT_PX * 0.35:.1f}" text-anchor="middle" '
            f'font-size="{LABEL_FONT_PX:.0f}" fill="{r.color}">{escape(r.label)}</text>'
        )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- PNG ----------------------------------------------------------------------------------------


def to_png(
    edges: Sequence[GraphEdge], path: str | os.PathLike[str], nodes: Iterable[str] = ()
) -> None:
    """Draw the same picture as ``to_svg`` into a PNG file with matplotlib.

    Raises:
        FailedPrecondition: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
        from matplotlib.path import Path as MplPath
    except ImportError:
        raise FailedPrecondition(
            "PNG output needs matplotlib: pip install 'natsmesh[bench]'; SVG needs nothing"
        ) from None

    lay = layout(edges, nodes)
    dpi = 100.0
    pt = 72.0 / dpi  # px -> points
    fig = Figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.set_axis_off()
    for r in lay.routes:
        verts: list[Point] = [r.start]
        codes = [MplPath.MOVETO]
        for seg in r.segments:
            verts += list(seg)
            codes += [MplPath.CURVE4] * 3 if len(seg) == 3 else [MplPath.LINETO]
        ax.add_patch(
            FancyArrowPatch(
                path=MplPath(verts, codes),
                arrowstyle="-|>,head_length=0.6,head_width=0.3",
                mutation_scale=10 * pt / 0.6,
                color=r.color,
                linewidth=r.width * pt,
                shrinkA=0,
                shrinkB=0,
            )
        )
    for name, (x, y) in lay.boxes.items():
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                lay.node_w,
                NODE_H,
                boxstyle="round,pad=0,rounding_size=8",
                facecolor=NODE_FILL,
                edgecolor=NODE_STROKE,
                linewidth=1.5 * pt,
            )
        )
        ax.text(
            x + lay.node_w / 2,
            y + NODE_H / 2,
            short_name(name),
            ha="center",
            va="center",
            fontsize=FONT_PX * pt,
            color=TEXT_COLOR,
            family="sans-serif",
        )
    for r in lay.routes:
        ax.text(
            r.label_at[0],
            r.label_at[1],
            r.label,
            ha="center",
            va="center",
            fontsize=LABEL_FONT_PX * pt,
            color=r.color,
            family="sans-serif",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none"},
        )
    fig.savefig(os.fspath(path), format="png", dpi=dpi, facecolor="white")
