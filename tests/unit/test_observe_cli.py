"""``mesh-policy top``'s table: its caption names the view it shows."""

from __future__ import annotations

from mesh.cli.observe import render_top
from mesh.control_plane import SignalRow, SignalsReply


def reply() -> SignalsReply:
    row = SignalRow(
        callee="researcher",
        endpoint="answer",
        caller="*",
        rps=1 / 60,
        success_rate=1.0,
        p50_ms=2.0,
        p99_ms=3.0,
        inflight=0,
        requests=1,
        errors=0,
    )
    return SignalsReply(window_s=60.0, rows=[row], edges=[], nodes=["researcher"])


def test_top_caption_names_the_server_side_by_default() -> None:
    assert render_top(reply()).title == "golden signals, last 60 s (server side)"


def test_top_client_caption_names_the_client_side() -> None:
    """`top --client` shows the callers' view, and says so."""
    assert render_top(reply(), client=True).title == "golden signals, last 60 s (client side)"
