"""Golden signals at their edges: the wire models' bounds, the counters across snapshots, the
quantiles at the ends of the histogram and the table's sums (``docs/observability.md``)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mesh._core.signals import (
    BUCKET_BOUNDS_MS,
    MAX_BUCKETS,
    MAX_CODES,
    MAX_EDGES_PER_REPORT,
    EdgeReport,
    EdgeSample,
    EdgeStats,
    SignalTable,
    quantile_ms,
)
from mesh.testing import FakeClock

KEY = ("a", "b", "e", "server")


def _sample(**fields: Any) -> EdgeSample:
    base: dict[str, Any] = {"caller": "a", "callee": "b", "endpoint": "e", "reporter": "server"}
    base.update(fields)
    return EdgeSample(**base)


def _report(edges: list[EdgeSample], **fields: Any) -> EdgeReport:
    base: dict[str, Any] = {"agent": "b", "instance": "i", "interval_s": 5.0, "at": 0.0}
    base.update(fields)
    return EdgeReport(edges=edges, **base)


class TestWireBounds:
    def test_defaults_are_zero(self) -> None:
        """A sample counts nothing by default, and zero is a valid count."""
        sample = _sample()

        assert (sample.requests, sample.errors, sample.inflight) == (0, 0, 0)
        assert _sample(requests=0, errors=0, inflight=0) == sample
        assert _report([], interval_s=0).interval_s == 0

    def test_limits(self) -> None:
        """At most 4096 edges a report, 64 buckets and 32 error codes a sample."""
        assert (MAX_EDGES_PER_REPORT, MAX_BUCKETS, MAX_CODES) == (4096, 64, 32)
        _report([_sample()] * 4096)
        with pytest.raises(ValidationError):
            _report([_sample()] * 4097)
        _sample(buckets=[0] * 64, codes={f"C{i}": 1 for i in range(32)})
        with pytest.raises(ValidationError):
            _sample(buckets=[0] * 65)
        with pytest.raises(ValidationError):
            _sample(codes={f"C{i}": 1 for i in range(33)})
        with pytest.raises(ValidationError):
            _report([], bucket_bounds_ms=[1.0] * 65)


class TestEdgeStats:
    def test_inflight_counts_down_to_nothing(self) -> None:
        """Two requests in flight, one ends: one left; the other ends: the edge is gone."""
        stats = EdgeStats("a", "i", now=0.0)
        stats.enter(KEY)
        stats.enter(KEY)

        stats.exit(KEY)
        assert stats.inflight == {KEY: 1}
        stats.exit(KEY)
        assert stats.inflight == {}

    def test_second_snapshot_counts_only_what_is_new(self) -> None:
        """A snapshot reports errors and buckets since the previous one; edges with nothing
        new are left out, whatever their order."""
        stats = EdgeStats("a", "i", now=0.0)
        other = ("a", "b", "a-first", "server")  # sorts before KEY
        stats.record(*other, "OK", 0.001)
        stats.record(*KEY, "UNAVAILABLE", 0.001)
        stats.snapshot_and_reset(1.0)
        stats.record(*KEY, "UNAVAILABLE", 0.001)
        stats.record(*KEY, "OK", 0.001)

        report = stats.snapshot_and_reset(2.0)

        assert [e.endpoint for e in report.edges] == ["e"]
        edge = report.edges[0]
        assert (edge.requests, edge.errors, edge.codes) == (2, 1, {"UNAVAILABLE": 1})
        assert sum(edge.buckets) == 2
        assert report.interval_s == 1.0

    def test_interval_never_negative(self) -> None:
        """A snapshot dated before the previous one (a clock step) has a zero interval."""
        stats = EdgeStats("a", "i", now=10.0)

        assert stats.snapshot_and_reset(5.0).interval_s == 0.0

    def test_totals_leave_out_codes_that_never_happened(self) -> None:
        """An edge with only errors has no OK total; one with one OK request has."""
        stats = EdgeStats("a", "i", now=0.0)
        stats.record(*KEY, "INTERNAL", 0.5)
        assert stats.totals() == [(KEY, "INTERNAL", 1, 0.5)]

        stats.record(*KEY, "OK", 0.25)
        assert stats.totals() == [(KEY, "OK", 1, 0.25), (KEY, "INTERNAL", 1, 0.5)]


class TestQuantiles:
    def test_one_request_is_a_histogram(self) -> None:
        """A single request gives a quantile inside its bucket, from 0 for the first bucket."""
        assert quantile_ms([1], 0.5) == 0.025
        assert quantile_ms([2], 0.5) == 0.025

    def test_empty_buckets_before_are_skipped(self) -> None:
        """The lowest quantile lands at the start of the first bucket with requests."""
        assert quantile_ms([0, 2], 0.0) == BUCKET_BOUNDS_MS[0]
        assert quantile_ms([0, 0, 4], 0.5) == pytest.approx(0.1 + 0.1 * 0.5)

    def test_beyond_the_last_request(self) -> None:
        """A rank past every request (q > 1) is the last bound."""
        assert quantile_ms([1], 2.0) == BUCKET_BOUNDS_MS[-1]


class TestTable:
    def test_default_window_is_a_minute(self) -> None:
        """The table's window is 60 s unless told; any positive window is allowed."""
        assert SignalTable().window == 60.0
        assert SignalTable(window=0.5).window == 0.5

    def test_nothing_covered_before_time_passes(self) -> None:
        """A report of a zero interval that just arrived covers no time yet; rates are then
        over a millisecond."""
        clock = FakeClock(100.0)
        table = SignalTable(clock=clock)
        table.add(_report([_sample(requests=1, buckets=[0, 0, 0, 1])], interval_s=0))

        assert table.covered() == 0.0
        (row,) = table.rows(by_caller=False)
        assert row.rps == 1000.0
        assert row.p50_ms == pytest.approx(0.2 + 0.2 * 0.5)

    def test_all_errors_is_a_zero_success_rate(self) -> None:
        """Requests that all failed have a success rate of 0, not None."""
        table = SignalTable(clock=FakeClock(100.0))
        table.add(_report([_sample(requests=1, errors=1, buckets=[1])]))

        assert table.rows(by_caller=False)[0].success_rate == 0.0

    def test_edges_without_traffic_make_no_row(self) -> None:
        """A sample with no requests and nothing in flight makes no row, and neither do the
        other reporter's samples."""
        table = SignalTable(clock=FakeClock(100.0))
        table.add(_report([_sample(), _sample(reporter="client", inflight=3, requests=1)]))

        assert table.rows() == []

    def test_the_other_reporters_edges_are_skipped_not_stopped_at(self) -> None:
        """In a report with the client's edges first, the server's are still counted."""
        table = SignalTable(clock=FakeClock(100.0))
        edges = [
            _sample(reporter="client", requests=1, buckets=[1], inflight=1),
            _sample(requests=2, buckets=[2], inflight=2),
        ]
        table.add(_report(edges))

        (row,) = table.rows(by_caller=False)
        assert (row.requests, row.inflight) == (2, 2)

    def test_latest_report_of_an_instance_wins_on_a_tie(self) -> None:
        """Of two reports of one instance arriving together with the same time, the later
        one gives the in-flight gauge."""
        table = SignalTable(clock=FakeClock(100.0))
        table.add(_report([_sample(inflight=1)], at=5.0))
        table.add(_report([_sample(inflight=2)], at=5.0))

        assert table.rows(by_caller=False)[0].inflight == 2

    def test_other_bounds_overflow_lands_in_ours(self) -> None:
        """A report binned with other bounds has its overflow bucket counted in ours."""
        table = SignalTable(clock=FakeClock(100.0))
        table.add(_report([_sample(requests=3, buckets=[0, 3])], bucket_bounds_ms=[1000.0]))

        (row,) = table.rows(by_caller=False)
        assert row.p99_ms == BUCKET_BOUNDS_MS[-1]

    def test_remaps_cached_up_to_16(self) -> None:
        """Up to 16 foreign bucket layouts are remembered."""
        table = SignalTable(clock=FakeClock(100.0))
        for i in range(20):
            table.add(_report([_sample(requests=1, buckets=[1])], bucket_bounds_ms=[1.0 + i]))
        table.rows()

        assert len(table._remaps) == 16


def test_foreign_bounds_zero_counts_add_nothing() -> None:
    """Empty buckets of a report with other bounds add nothing to ours."""
    table = SignalTable(clock=FakeClock(100.0))
    table.add(_report([_sample(requests=1, buckets=[0, 1])], bucket_bounds_ms=[1000.0]))

    (row,) = table.rows(by_caller=False)
    assert row.p50_ms == BUCKET_BOUNDS_MS[-1]


def test_one_request_in_flight_counts() -> None:
    """A single request in flight shows as one."""
    table = SignalTable(clock=FakeClock(100.0))
    table.add(_report([_sample(inflight=1)]))

    assert table.rows(by_caller=False)[0].inflight == 1
