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


def test_top_lists_open_circuits_and_ejections_after_the_signals() -> None:
    """Callers' circuits that are not closed and the instances they ejected follow the table,
    one line each, with the time an ejection had left."""
    from rich.console import Console

    from mesh.control_plane import TrafficRow

    r = reply()
    r.traffic = [
        TrafficRow(caller="planner.p1", kind="circuit", target="researcher (researcher.*)",
                   state="open"),
        TrafficRow(caller="planner.p1", kind="ejection", target="researcher.r2",
                   state="ejected", seconds_left=29.6),
    ]  # fmt: skip
    console = Console(width=200, record=True)
    console.print(render_top(r))
    text = console.export_text()
    assert "circuits not closed, ejected instances" in text
    assert "planner.p1 │ researcher (researcher.*) │ open" in text
    assert "planner.p1 │ researcher.r2             │ ejected (30 s left when reported)" in text
