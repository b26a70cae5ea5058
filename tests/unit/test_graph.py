"""Unit tests for mesh.graph: the dependency graph as text, DOT, Mermaid, SVG and PNG, and the
``top`` table."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mesh._core.signals import GraphEdge, SignalRow
from mesh.cli.graph import (
    NODE_H,
    TOP_HEADER,
    edge_label,
    layout,
    to_dot,
    to_mermaid,
    to_png,
    to_svg,
    to_text,
    top_table,
)
from mesh.errors import FailedPrecondition

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG = ("planner", "librarian")


def edge(
    caller: str, callee: str, rps: float, success: float | None = 1.0, p99: float = 8.0
) -> GraphEdge:
    return GraphEdge(
        caller=caller,
        callee=callee,
        requests=int(rps * 60),
        rps=rps,
        success_rate=success,
        p99_ms=p99,
    )


@pytest.fixture
def three() -> list[GraphEdge]:
    """planner -> researcher -> librarian, and planner -> librarian directly."""
    return [
        edge("planner", "researcher", 12.3, 0.995),
        edge("researcher", "librarian", 30.1, 1.0),
        edge("planner", "librarian", 2.0, 0.93),
    ]


def svg_tree(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    return root


def edge_paths(root: ET.Element) -> list[ET.Element]:
    return [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


class TestLabels:
    def test_label_shows_rate_and_success(self) -> None:
        assert edge_label(edge("a", "b", 12.34, 0.995)) == "12.3 rps, 99.5 %"
        assert edge_label(edge("a", "b", 0.25, 1.0)) == "0.25 rps, 100 %"
        assert edge_label(edge("a", "b", 250.0, None)) == "250 rps"

    def test_failures_never_round_up_to_100(self) -> None:
        assert edge_label(edge("a", "b", 1.0, 0.99999)) == "1.0 rps, 99.9 %"


class TestText:
    def test_lists_every_edge_under_its_caller(self, three: list[GraphEdge]) -> None:
        out = to_text(three)
        lines = out.splitlines()

        assert lines[0] == "planner"  # the agent nobody calls comes first
        assert lines.index("researcher") > 0
        for e in three:
            under = lines[lines.index(e.caller) + 1 :]
            assert any(e.callee in line and edge_label(e).split(",")[0] in line for line in under)
        assert "99.5 %" in out and "93.0 %" in out and "p99 8.00 ms" in out

    def test_empty_and_isolated(self) -> None:
        assert "no calls" in to_text([])
        assert "lonely  (no calls)" in to_text([], nodes=["lonely"])


class TestDot:
    def test_has_every_edge_with_its_label(self, three: list[GraphEdge]) -> None:
        out = to_dot(three)

        assert out.startswith("digraph mesh {")
        assert out.rstrip().endswith("}")
        assert out.count("{") == out.count("}")
        assert "rankdir=LR" in out
        for e in three:
            assert f'"{e.caller}" -> "{e.callee}" [label="{edge_label(e)}"' in out
        assert '"planner" -> "researcher" [label="12.3 rps, 99.5 %"' in out

    def test_quotes_are_escaped(self) -> None:
        out = to_dot([edge('we"ird\\', "b", 1.0)])
        assert '"we\\"ird\\\\" -> "b"' in out


class TestMermaid:
    def test_flowchart_with_each_edge(self, three: list[GraphEdge]) -> None:
        out = to_mermaid(three)
        lines = [line.strip() for line in out.splitlines()]

        assert lines[0] == "flowchart LR"
        for e in three:
            assert f'{e.caller} -->|"{edge_label(e)}"| {e.callee}' in lines
        assert 'researcher["researcher"]' in lines
        assert "linkStyle 2 stroke:#c53030" in lines  # the failing edge is red

    def test_ids_are_safe(self) -> None:
        out = to_mermaid([edge("end", "search-engine", 1.0), edge("9lives", "end", 1.0)])
        assert 'n_end["end"]' in out
        assert 'search_engine["search-engine"]' in out
        assert 'n_9lives["9lives"]' in out
        assert "n_end -->" in out


class TestSvg:
    def test_well_formed_with_nodes_and_one_path_per_edge(self, three: list[GraphEdge]) -> None:
        root = svg_tree(to_svg(three))

        words = texts(root)
        for name in ("planner", "researcher", "librarian"):
            assert name in words
        for e in three:
            assert edge_label(e) in words
        paths = edge_paths(root)
        assert len(paths) == len(three)
        assert all((p.get("marker-end") or "").startswith("url(#arrow") for p in paths)
        markers = {m.get("id") for m in root.iter(f"{SVG}marker")}
        assert {"arrow0", "arrow1", "arrow2"} <= markers

    def test_layers_run_left_to_right(self, three: list[GraphEdge]) -> None:
        lay = layout(three)

        assert lay.layer == {"planner": 0, "researcher": 1, "librarian": 2}
        xs = {n: lay.boxes[n][0] for n in ("planner", "researcher", "librarian")}
        assert xs["planner"] < xs["researcher"] < xs["librarian"]
        assert min(x for x, _ in lay.boxes.values()) > 0
        assert max(x for x, _ in lay.boxes.values()) + lay.node_w < lay.width

    def test_long_edge_goes_around_the_middle_agent(self, three: list[GraphEdge]) -> None:
        """planner -> librarian skips a layer: it passes through a free slot, not researcher."""
        lay = layout(three)
        [route] = [r for r in lay.routes if (r.edge.caller, r.edge.callee) == LONG]
        _, top = lay.boxes["researcher"]
        straight = [seg[0] for seg in route.segments if len(seg) == 1]

        assert straight, "the long edge has a straight piece through its slot"
        assert all(not (top <= y <= top + NODE_H) for _, y in straight)

    def test_escapes_text(self) -> None:
        root = svg_tree(to_svg([edge("a<b&c", 'q"uote', 1.0)]))
        assert {"a<b&c", 'q"uote'} <= set(texts(root))

    def test_cycles_and_self_calls(self) -> None:
        edges = [
            edge("a", "b", 5.0),
            edge("b", "c", 4.0),
            edge("c", "a", 0.5),
            edge("b", "b", 1.0),
            edge("c", "b", 0.2, 0.5),
        ]
        lay = layout(edges)
        root = svg_tree(to_svg(edges))

        kinds = sorted(r.kind for r in lay.routes)
        assert kinds == ["back", "back", "forward", "forward", "self"]
        assert len(edge_paths(root)) == len(edges)
        assert lay.layer["a"] < lay.layer["b"] < lay.layer["c"]

    def test_same_input_same_picture(self, three: list[GraphEdge]) -> None:
        assert to_svg(three) == to_svg([e.model_copy() for e in three])
        assert layout(three).boxes == layout(list(reversed(three))).boxes

    def test_empty_graph(self) -> None:
        root = svg_tree(to_svg([]))
        assert edge_paths(root) == []
        assert "lonely" in texts(svg_tree(to_svg([], nodes=["lonely"])))


class TestPng:
    def test_writes_a_png(self, three: list[GraphEdge], tmp_path: Path) -> None:
        pytest.importorskip("matplotlib", reason="PNG output needs the optional matplotlib")
        out = tmp_path / "graph.png"

        to_png(three, out)

        assert out.read_bytes().startswith(PNG_SIGNATURE)

    def test_without_matplotlib_says_what_to_install(
        self, three: list[GraphEdge], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in list(sys.modules):
            if name == "matplotlib" or name.startswith("matplotlib."):
                monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "matplotlib", None)

        with pytest.raises(FailedPrecondition, match=r"pip install 'natsmesh\[bench\]'"):
            to_png(three, tmp_path / "graph.png")
        assert not (tmp_path / "graph.png").exists()


class TestTop:
    def test_header_then_formatted_rows(self) -> None:
        rows = [
            SignalRow(
                callee="researcher",
                endpoint="answer",
                caller="*",
                rps=12.345,
                success_rate=0.995,
                p50_ms=0.42,
                p99_ms=18.2,
                inflight=3,
                requests=740,
                errors=4,
            ),
            SignalRow(
                callee="researcher",
                endpoint="answer",
                caller="planner",
                rps=10.0,
                success_rate=1.0,
                p50_ms=2.5,
                p99_ms=1500.0,
                inflight=2,
                requests=600,
                errors=0,
            ),
            SignalRow(
                callee="librarian",
                endpoint="lookup",
                caller="cli",
                rps=0.0,
                success_rate=None,
                p50_ms=None,
                p99_ms=None,
                inflight=1,
                requests=0,
                errors=0,
            ),
        ]

        table = top_table(rows)

        assert (
            table[0]
            == TOP_HEADER
            == [
                "AGENT",
                "ENDPOINT",
                "RPS",
                "SUCCESS",
                "P50",
                "P99",
                "INFLIGHT",
            ]
        )
        assert table[1] == ["researcher", "answer", "12.3", "99.5 %", "420 µs", "18.2 ms", "3"]
        assert table[2] == ["", "  ← planner", "10.0", "100 %", "2.50 ms", "1.50 s", "2"]
        assert table[3] == ["librarian", "lookup ← cli", "0.0", "-", "-", "-", "1"]
        assert all(len(r) == len(TOP_HEADER) for r in table)
