"""The picture's layout, which needs no Graphviz: ``layout`` places agents in layers by the
longest path from the callers nobody calls (left to right), orders each layer to cut crossings
(barycentre sweeps), spaces it evenly, routes long edges through the free slots of the layers
they cross, and bows cycle edges around the nodes. ``render`` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from mesh._core.signals import GraphEdge

__all__ = [
    "EDGE_COLORS",
    "LABEL_CHAR_W",
    "LABEL_FONT_PX",
    "NODE_H",
    "Layout",
    "Point",
    "Ranking",
    "Route",
    "edge_label",
    "edge_widths",
    "fmt_pct",
    "fmt_rps",
    "layout",
    "nodes_of",
    "rank",
    "severity",
    "short_name",
]

# Geometry of the picture, in px (SVG user units; the PNG uses 100 dpi, so the same numbers).
LABEL_FONT_PX = 11.0
CHAR_W = 7.6  # mean advance of a 13 px sans-serif character, generous
LABEL_CHAR_W = 6.4
NODE_H = 36.0
NODE_PAD = 16.0
MIN_NODE_W = 96.0
ROW_GAP = 44.0
MIN_COL_GAP = 140.0
MARGIN = 20.0
MAX_NAME = 32
EDGE_COLORS = ("#4a5568", "#c05621", "#c53030")  # healthy, degraded (< 99 %), failing (< 95 %)

Point = tuple[float, float]


# --- labels and strokes (the renderers use them too) ----------------------------------------------


def fmt_rps(rps: float) -> str:
    """A request rate with the precision its size calls for."""
    if rps >= 100:
        return f"{rps:.0f}"
    if rps >= 1 or rps == 0:
        return f"{rps:.1f}"
    return f"{rps:.2f}"


def fmt_pct(rate: float) -> str:
    """A success rate as a percentage, ``"99.5 %"``: one decimal wherever the mesh shows one
    (``top``, ``graph``), ``"100 %"`` only when nothing failed (a failure never rounds up)."""
    if rate >= 1.0:
        return "100 %"
    return f"{min(rate * 100, 99.9):.1f} %"


def edge_label(edge: GraphEdge) -> str:
    """``"12.3 rps, 99.5 %"`` (the rate alone when the window has no finished request)."""
    text = f"{fmt_rps(edge.rps)} rps"
    if edge.success_rate is not None:
        text += f", {fmt_pct(edge.success_rate)}"
    return text


def severity(edge: GraphEdge) -> int:
    """0 healthy, 1 degraded, 2 failing: an index into ``EDGE_COLORS``."""
    rate = edge.success_rate
    if rate is None or rate >= 0.99:
        return 0
    return 1 if rate >= 0.95 else 2


def short_name(name: str) -> str:
    """An agent name cut to ``MAX_NAME`` characters for its box."""
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def nodes_of(edges: Sequence[GraphEdge], nodes: Iterable[str]) -> list[str]:
    """Every agent named by an edge or in ``nodes``, sorted."""
    names = set(nodes)
    for e in edges:
        names.add(e.caller)
        names.add(e.callee)
    return sorted(names)


def edge_widths(edges: Sequence[GraphEdge]) -> list[float]:
    """Stroke widths from 1.2 to 3.5 by log of the rate, relative to the busiest edge."""
    top = max((e.rps for e in edges), default=0.0)
    if top <= 0:
        return [1.2] * len(edges)
    return [1.2 + 2.3 * math.log1p(e.rps) / math.log1p(top) for e in edges]


# --- layout -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Route:
    """One edge's path: ``start``, then segments ``("C", c1, c2, end)`` or ``("L", end)``."""

    edge: GraphEdge
    start: Point
    segments: list[tuple[Point, ...]]
    label: str
    label_at: Point
    color: str
    width: float
    kind: str  # "forward", "back" or "self"


@dataclass(slots=True)
class Layout:
    """Where everything goes, in px, origin top left."""

    width: float
    height: float
    node_w: float
    boxes: dict[str, tuple[float, float]]  # name -> top-left corner (all nodes are node_w x NODE_H)
    routes: list[Route]
    layer: dict[str, int]
    order: dict[str, int]


def _back_edges(
    names: list[str], succ: dict[str, list[str]], has_pred: set[str]
) -> set[tuple[str, str]]:
    """Edges that close a cycle, found by a deterministic depth-first search."""
    state: dict[str, int] = {}
    back: set[tuple[str, str]] = set()
    for root in [n for n in names if n not in has_pred] + names:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(succ[root]))]
        while stack:
            u, it = stack[-1]
            for v in it:
                seen = state.get(v)
                if seen is None:
                    state[v] = 1
                    stack.append((v, iter(succ[v])))
                    break
                if seen == 1:
                    back.add((u, v))
            else:
                state[u] = 2
                stack.pop()
    return back


def _cubic(p0: Point, c1: Point, c2: Point, p1: Point, t: float) -> Point:
    s = 1 - t
    a, b, c, d = s * s * s, 3 * s * s * t, 3 * s * t * t, t * t * t
    return (
        a * p0[0] + b * c1[0] + c * c2[0] + d * p1[0],
        a * p0[1] + b * c1[1] + c * c2[1] + d * p1[1],
    )


def _smooth(a: Point, b: Point) -> tuple[Point, ...]:
    """A cubic from ``a`` to ``b`` leaving and arriving horizontally."""
    dx = (b[0] - a[0]) / 2
    return ((a[0] + dx, a[1]), (b[0] - dx, b[1]), b)


@dataclass(slots=True)
class Ranking:
    """Where ``rank`` puts the agents: columns, rows, and the free slots long edges pass."""

    back: set[tuple[str, str]]  # edges drawn right to left (they close a cycle)
    layer: dict[str, int]  # agent -> column
    chains: dict[tuple[str, str], list[str]]  # edge -> the free slots it passes through
    layers: list[list[str]]  # column -> agents and slots, top to bottom
    order: dict[str, int]  # agent -> row in its column


def rank(edges: Sequence[GraphEdge], names: list[str]) -> Ranking:
    """Columns by longest path from the sources, rows by barycentre sweeps."""
    succ: dict[str, list[str]] = {n: [] for n in names}
    has_pred: set[str] = set()
    # Busiest calls first: the search keeps them as tree edges, so the edges that close a
    # cycle (drawn backwards) tend to be the light ones.
    for e in sorted(edges, key=lambda e: (e.caller, -e.rps, e.callee)):
        if e.caller != e.callee and e.callee not in succ[e.caller]:
            succ[e.caller].append(e.callee)
            has_pred.add(e.callee)
    back = _back_edges(names, succ, has_pred)

    # Layers: longest path from the sources over the edges that close no cycle.
    dag = {n: [v for v in succ[n] if (n, v) not in back] for n in names}
    indeg = {n: 0 for n in names}
    for n in names:
        for v in dag[n]:
            indeg[v] += 1
    layer = dict.fromkeys(names, 0)
    ready = [n for n in names if indeg[n] == 0]
    while ready:
        u = ready.pop()
        for v in dag[u]:
            layer[v] = max(layer[v], layer[u] + 1)
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)

    # Long edges (and edges back to an earlier layer) pass through one free slot per layer
    # they cross, so no edge runs through an agent's box.
    chains: dict[tuple[str, str], list[str]] = {}
    links: list[tuple[str, str]] = []  # between adjacent layers, for ordering
    slot_layer = dict(layer)
    for u in names:
        for v in succ[u]:
            lo, hi = sorted((layer[u], layer[v]))
            chain = [f"\0{u}\0{v}\0{k}" for k in range(lo + 1, hi)]
            for d, k in zip(chain, range(lo + 1, hi), strict=True):
                slot_layer[d] = k
            chains[(u, v)] = chain
            path = [u, *chain, v] if layer[u] < layer[v] else [v, *chain, u]
            links += list(pairwise(path))
    depth = max(slot_layer.values(), default=-1) + 1
    layers: list[list[str]] = [[] for _ in range(depth)]
    for s in sorted(slot_layer):
        layers[slot_layer[s]].append(s)

    # Order each layer by the mean position of its neighbours (down, then up; four times).
    ups: dict[str, list[str]] = {s: [] for s in slot_layer}
    downs: dict[str, list[str]] = {s: [] for s in slot_layer}
    for a, b in links:
        downs[a].append(b)
        ups[b].append(a)
    pos = {s: float(i) for lay in layers for i, s in enumerate(lay)}
    for _ in range(4):
        for seq, nbrs in ((range(1, depth), ups), (range(depth - 2, -1, -1), downs)):
            for k in seq:
                keyed = []
                for i, s in enumerate(layers[k]):
                    around = nbrs[s]
                    bary = sum(pos[x] for x in around) / len(around) if around else pos[s]
                    keyed.append((bary, i, s))
                layers[k] = [s for _, _, s in sorted(keyed)]
                pos.update({s: float(i) for i, s in enumerate(layers[k])})
    order = {s: int(pos[s]) for s in names}
    return Ranking(back, layer, chains, layers, order)


def layout(edges: Sequence[GraphEdge], nodes: Iterable[str] = ()) -> Layout:
    """Place the agents and route the edges (deterministic: same input, same picture)."""
    names = nodes_of(edges, nodes)
    ranked = rank(edges, names)
    back, layer, chains, layers = ranked.back, ranked.layer, ranked.chains, ranked.layers

    # Sizes and places.
    widths = edge_widths(edges)
    labels = [edge_label(e) for e in edges]
    node_w = max(
        [MIN_NODE_W] + [len(short_name(n)) * CHAR_W + 2 * NODE_PAD for n in names],
    )
    label_w = max((len(t) * LABEL_CHAR_W + 10 for t in labels), default=0.0)
    col_gap = max(MIN_COL_GAP, label_w + 72)
    tallest = max((len(lay) for lay in layers), default=0)
    slot_h = NODE_H + ROW_GAP
    place: dict[str, tuple[float, float]] = {}
    for k, lay in enumerate(layers):
        top = (tallest - len(lay)) * slot_h / 2
        for i, s in enumerate(lay):
            place[s] = (k * (node_w + col_gap), top + i * slot_h)
    boxes = {n: place[n] for n in names}

    def centre_y(s: str) -> float:
        return place[s][1] + NODE_H / 2

    # Ports: the edges meeting one side of a box spread along it, ordered by where their
    # other end lies, so they neither cross nor overlap there.
    hops: list[list[str]] = []
    ports: dict[tuple[str, bool], list[tuple[float, int, int, int]]] = {}
    for i, e in enumerate(edges):
        u, v = e.caller, e.callee
        if u == v:
            hops.append([])
            continue
        forward = (u, v) not in back
        path = [u, *(chains[(u, v)] if forward else chains[(u, v)][::-1]), v]
        hops.append(path)
        ports.setdefault((u, forward), []).append((centre_y(path[1]), int(not forward), i, 0))
        ports.setdefault((v, not forward), []).append((centre_y(path[-2]), int(not forward), i, 1))
    offset: dict[tuple[int, int], float] = {}
    for attached in ports.values():
        attached.sort()
        count = len(attached)
        step = min(8.0, NODE_H * 0.6 / max(1, count - 1))
        for k, (_, _, i, which) in enumerate(attached):
            offset[(i, which)] = (k - (count - 1) / 2) * step

    # Routes, with candidate places for their labels.
    routes: list[Route] = []
    candidates: list[list[Point]] = []
    ts = (0.5, 0.35, 0.65, 0.42, 0.58, 0.22, 0.78, 0.28, 0.72, 0.15, 0.85)
    for i, (e, w, text) in enumerate(zip(edges, widths, labels, strict=True)):
        color = EDGE_COLORS[severity(e)]
        path = hops[i]
        if not path:  # a loop on the top of the box
            x, y = place[e.caller]
            lx, rx = x + node_w - 46, x + node_w - 14
            start = (lx, y)
            segs: list[tuple[Point, ...]] = [((lx - 6, y - 30), (rx + 6, y - 30), (rx, y))]
            routes.append(Route(e, start, segs, text, start, color, w, "self"))
            candidates.append([((lx + rx) / 2, y - 31), (rx + 12 + len(text) * 3.2, y - 14)])
            continue
        forward = (e.caller, e.callee) not in back
        start = (
            place[path[0]][0] + (node_w if forward else 0),
            centre_y(path[0]) + offset[(i, 0)],
        )
        end = (place[path[-1]][0] + (0 if forward else node_w), centre_y(path[-1]) + offset[(i, 1)])
        segs = []
        at = start
        for d in path[1:-1]:
            segs.append(_smooth(at, (place[d][0] + (0 if forward else node_w), centre_y(d))))
            at = (place[d][0] + (node_w if forward else 0), centre_y(d))
            segs.append((at,))
        segs.append(_smooth(at, end))
        routes.append(
            Route(e, start, segs, text, start, color, w, "forward" if forward else "back")
        )
        spots = [(place[d][0] + node_w / 2, centre_y(d)) for d in path[1:-1]]
        first = segs[0]
        spots += [_cubic(start, first[0], first[1], first[2], t) for t in ts]
        if len(segs) > 1:
            last = segs[-1]
            spots += [_cubic(segs[-2][-1], last[0], last[1], last[2], t) for t in ts]
        candidates.append(spots)

    # Labels, busiest edge first: the candidate that overlaps no box and no label placed
    # before, and crosses the fewest other edges (earlier candidates win ties).
    taken = [(x - 4, y - 4, x + node_w + 4, y + NODE_H + 4) for x, y in boxes.values()]
    traces = [_samples(r, 12) for r in routes]
    extents = [
        (min(p[0] for p in t), min(p[1] for p in t), max(p[0] for p in t), max(p[1] for p in t))
        for t in traces
    ]
    half_h = LABEL_FONT_PX * 0.7
    for k in sorted(range(len(routes)), key=lambda k: (-routes[k].edge.rps, k)):
        route, spots = routes[k], candidates[k]
        half_w = (len(route.label) * LABEL_CHAR_W + 10) / 2
        best: tuple[float, Point] | None = None
        for nth, spot in enumerate(spots):
            rect = (spot[0] - half_w, spot[1] - half_h, spot[0] + half_w, spot[1] + half_h)
            score = 1000.0 * sum(_overlap(rect, other) for other in taken) + 2.0 * nth
            for m, trace in enumerate(traces):
                if m != k and _overlap(rect, extents[m]):
                    score += sum(
                        rect[0] <= px <= rect[2] and rect[1] <= py <= rect[3] for px, py in trace
                    )
            if best is None or score < best[0]:
                best = (score, spot)
        assert best is not None
        chosen = best[1]
        route.label_at = chosen
        taken.append(
            (chosen[0] - half_w, chosen[1] - half_h, chosen[0] + half_w, chosen[1] + half_h)
        )

    # Shift everything so the drawing starts at the margin; size the canvas to fit.
    xs: list[float] = []
    ys: list[float] = []
    for x, y in boxes.values():
        xs += [x, x + node_w]
        ys += [y, y + NODE_H]
    for rect in taken:
        xs += [rect[0], rect[2]]
        ys += [rect[1], rect[3]]
    for trace in traces:
        xs += [p[0] for p in trace]
        ys += [p[1] for p in trace]
    if not xs:
        return Layout(2 * MARGIN, 2 * MARGIN, node_w, {}, [], {}, {})
    dx, dy = MARGIN - min(xs), MARGIN - min(ys)

    def shift(p: Point) -> Point:
        return (p[0] + dx, p[1] + dy)

    for r in routes:
        r.start = shift(r.start)
        r.segments = [tuple(shift(p) for p in seg) for seg in r.segments]
        r.label_at = shift(r.label_at)
    boxes = {n: shift(p) for n, p in boxes.items()}
    return Layout(
        width=math.ceil(max(xs) - min(xs) + 2 * MARGIN),
        height=math.ceil(max(ys) - min(ys) + 2 * MARGIN),
        node_w=node_w,
        boxes=boxes,
        routes=routes,
        layer=layer,
        order=ranked.order,
    )


def _samples(route: Route, n: int) -> list[Point]:
    """Points along a route: ``n`` per curve, 4 per straight piece."""
    out = [route.start]
    at = route.start
    for seg in route.segments:
        if len(seg) == 3:
            out += [_cubic(at, seg[0], seg[1], seg[2], i / n) for i in range(1, n + 1)]
        else:
            out += [(at[0] + (seg[0][0] - at[0]) * i / 4, at[1]) for i in range(1, 5)]
        at = seg[-1]
    return out


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
