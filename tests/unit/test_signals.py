"""Unit tests for mesh.signals: per-edge counters in each instance, and the registry's window."""

from __future__ import annotations

import random
from bisect import bisect_left
from itertools import pairwise

import pytest
from pydantic import ValidationError

from mesh._core.signals import (
    BUCKET_BOUNDS_MS,
    BUCKET_BOUNDS_S,
    EdgeKey,
    EdgeReport,
    EdgeSample,
    EdgeStats,
    Reporter,
    SignalRow,
    SignalTable,
    quantile_ms,
)
from mesh.testing import FakeClock


def report(
    agent: str,
    instance: str,
    samples: list[tuple[str, str, str, int, int, float]],
    *,
    interval: float = 10.0,
    reporter: Reporter = "server",
    inflight: int = 0,
) -> EdgeReport:
    """A report built through ``EdgeStats``: (caller, callee, endpoint, ok, errors, seconds)."""
    stats = EdgeStats(agent, instance, now=0.0)
    for caller, callee, endpoint, ok, errors, seconds in samples:
        for _ in range(ok):
            stats.record(caller, callee, endpoint, reporter, "OK", seconds)
        for _ in range(errors):
            stats.record(caller, callee, endpoint, reporter, "UNAVAILABLE", seconds)
        for _ in range(inflight):
            stats.enter((caller, callee, endpoint, reporter))
    return stats.snapshot_and_reset(interval)


def row(rows: list[SignalRow], callee: str, endpoint: str, caller: str = "*") -> SignalRow:
    [found] = [r for r in rows if (r.callee, r.endpoint, r.caller) == (callee, endpoint, caller)]
    return found


class TestEdgeStats:
    def test_record_snapshot_and_reset(self) -> None:
        """A snapshot holds the counts since the last one, then the counters start afresh."""
        stats = EdgeStats("researcher", "r1", now=100.0)
        stats.record("planner", "researcher", "answer", "server", "OK", 0.002)
        stats.record("planner", "researcher", "answer", "server", "OK", 0.003)
        stats.record("planner", "researcher", "answer", "server", "INTERNAL", 0.004)
        stats.record("researcher", "librarian", "lookup", "client", "OK", 0.001)

        first = stats.snapshot_and_reset(110.0)
        second = stats.snapshot_and_reset(115.0)

        assert (first.agent, first.instance, first.interval_s, first.at) == (
            "researcher",
            "r1",
            10.0,
            110.0,
        )
        by_key = {(s.caller, s.callee, s.endpoint, s.reporter): s for s in first.edges}
        answer = by_key[("planner", "researcher", "answer", "server")]
        assert (answer.requests, answer.errors, answer.codes) == (3, 1, {"INTERNAL": 1})
        assert sum(answer.buckets) == 3
        lookup = by_key[("researcher", "librarian", "lookup", "client")]
        assert (lookup.requests, lookup.errors, lookup.codes) == (1, 0, {})
        assert first.bucket_bounds_ms == list(BUCKET_BOUNDS_MS)
        assert (second.interval_s, second.edges) == (5.0, [])

    @pytest.mark.parametrize(
        ("seconds", "bucket"),
        [
            (0.0, 0),
            (50e-6, 0),  # a bound belongs to the bucket it closes (Prometheus "le")
            (51e-6, 1),
            (0.0012, 5),  # 0.8 ms < 1.2 ms <= 1.6 ms
            (0.0016, 5),
            (1.0, 15),  # 0.8192 s < 1 s <= 1.6384 s
            (52.4288, 20),
            (60.0, 21),  # overflow
            (3600.0, 21),
        ],
    )
    def test_histogram_bucket_placement(self, seconds: float, bucket: int) -> None:
        """Bucket i counts bounds[i-1] < seconds <= bounds[i]; the last one counts the rest."""
        stats = EdgeStats("a", "i", now=0.0)
        stats.record("x", "a", "e", "server", "OK", seconds)

        [sample] = stats.snapshot_and_reset(1.0).edges

        assert len(sample.buckets) == bucket + 1  # trailing zeros dropped
        assert sample.buckets[bucket] == 1
        assert sum(sample.buckets) == 1

    def test_bounds_are_log_scale_from_50_us_to_about_a_minute(self) -> None:
        assert BUCKET_BOUNDS_S[0] == pytest.approx(50e-6)
        assert all(b == pytest.approx(2 * a) for a, b in pairwise(BUCKET_BOUNDS_S))
        assert 30 < BUCKET_BOUNDS_S[-1] < 60
        assert len(BUCKET_BOUNDS_S) + 1 == 22

    def test_inflight_is_a_gauge_that_snapshots_keep(self) -> None:
        """In-flight counts survive snapshots; an edge with calls in flight but none finished
        still appears."""
        stats = EdgeStats("a", "i", now=0.0)
        key: EdgeKey = ("planner", "a", "run", "server")
        stats.enter(key)
        stats.enter(key)

        [only] = stats.snapshot_and_reset(1.0).edges
        stats.finish(key, "OK", 0.01)
        [after] = stats.snapshot_and_reset(2.0).edges
        stats.exit(key)
        stats.exit(key)  # one too many: never negative

        assert (only.requests, only.inflight, only.buckets) == (0, 2, [])
        assert (after.requests, after.inflight) == (1, 1)
        assert stats.inflight == {}
        assert stats.snapshot_and_reset(3.0).edges == []

    def test_cumulative_readers_never_go_back(self) -> None:
        """The readers behind the OpenTelemetry counters keep counting across snapshots."""
        stats = EdgeStats("r", "r1", now=0.0)
        key: EdgeKey = ("p", "r", "e", "server")
        stats.record(*key, "OK", 0.002)
        stats.record(*key, "OK", 0.004)
        stats.record(*key, "INTERNAL", 0.5)
        first = stats.snapshot_and_reset(10.0)
        stats.record(*key, "INTERNAL", 0.25)
        stats.enter(key)

        second = stats.snapshot_and_reset(20.0)
        totals = stats.totals()
        buckets = stats.cumulative_buckets()

        assert [(e.requests, e.codes) for e in first.edges] == [(3, {"INTERNAL": 1})]
        assert [(e.requests, e.codes, e.inflight) for e in second.edges] == [
            (1, {"INTERNAL": 1}, 1)
        ]
        assert [(k, code, n) for k, code, n, _ in totals] == [(key, "OK", 2), (key, "INTERNAL", 2)]
        assert [spent for *_, spent in totals] == pytest.approx([0.006, 0.75])
        assert len(buckets) == len(BUCKET_BOUNDS_S) + 1
        assert buckets[0] == (key, "5e-05", 0)
        assert buckets[-1] == (key, "+Inf", 4)
        counts = [n for _, _, n in buckets]
        assert counts == sorted(counts)
        assert stats.inflight_by_edge() == [(key, 1)]
        stats.exit(key)
        assert stats.inflight_by_edge() == [(key, 0)]  # the series stays, at zero

    def test_histograms_are_per_edge_whatever_the_code(self) -> None:
        """The Prometheus reader: one cumulative histogram per edge, its +Inf bucket the
        edge's request count and its sum the time of every request, OK or not."""
        stats = EdgeStats("r", "r1", now=0.0)
        key: EdgeKey = ("p", "r", "e", "server")
        stats.record(*key, "OK", 0.002)
        stats.record(*key, "INTERNAL", 0.5)
        stats.snapshot_and_reset(1.0)
        stats.record(*key, "OK", 0.004)

        [(edge, buckets, seconds)] = stats.histograms()

        counts = [n for _, n in buckets]
        assert edge == key
        assert [le for le, _ in buckets][-1] == "+Inf"
        assert len(buckets) == len(BUCKET_BOUNDS_S) + 1
        assert counts == sorted(counts) and counts[-1] == 3
        assert seconds == pytest.approx(0.506)

    def test_report_json_is_small_and_round_trips(self) -> None:
        rep = report("researcher", "r1", [("planner", "researcher", "answer", 99, 1, 0.002)])

        raw = rep.model_dump_json(exclude_defaults=True)

        assert EdgeReport.model_validate_json(raw) == rep
        assert len(raw) < 400

    def test_wire_models_refuse_nonsense(self) -> None:
        with pytest.raises(ValidationError):
            EdgeSample(caller="a", callee="b", endpoint="e", reporter="server", requests=-1)
        with pytest.raises(ValidationError):
            EdgeSample.model_validate(
                {"caller": "a", "callee": "b", "endpoint": "e", "reporter": "sideways"}
            )
        with pytest.raises(ValidationError):
            EdgeSample(caller="a", callee="b", endpoint="e", reporter="server", buckets=[1] * 65)


class TestQuantiles:
    def test_empty_histogram_has_no_quantile(self) -> None:
        assert quantile_ms([], 0.5) is None
        assert quantile_ms([0, 0, 0], 0.99) is None

    def test_linear_inside_one_bucket(self) -> None:
        """Ten values in (0.1 ms, 0.2 ms]: the median is halfway through the bucket."""
        assert quantile_ms([0, 0, 10], 0.5) == pytest.approx(0.15)
        assert quantile_ms([0, 0, 10], 1.0) == pytest.approx(0.2)

    def test_overflow_reports_the_last_bound(self) -> None:
        buckets = [0] * 21 + [5]
        assert quantile_ms(buckets, 0.5) == BUCKET_BOUNDS_MS[-1]

    @pytest.mark.parametrize("dist", ["uniform", "lognormal", "bimodal"])
    @pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
    def test_within_one_bucket_of_the_truth(self, dist: str, q: float) -> None:
        """Quantiles from the merged histograms of two instances land in the true value's
        bucket (so the error is at most that bucket's width)."""
        rng = random.Random(7)
        if dist == "uniform":
            values = [rng.uniform(0.0005, 0.2) for _ in range(4000)]
        elif dist == "lognormal":
            values = [rng.lognormvariate(-6.0, 1.0) for _ in range(4000)]
        else:
            values = [rng.gauss(0.002, 0.0002) for _ in range(3000)]
            values += [rng.gauss(0.5, 0.05) for _ in range(1000)]
        clock = FakeClock()
        table = SignalTable(clock=clock)
        for part, instance in ((values[::2], "r1"), (values[1::2], "r2")):
            stats = EdgeStats("researcher", instance, now=0.0)
            for v in part:
                stats.record("planner", "researcher", "answer", "server", "OK", v)
            table.add(stats.snapshot_and_reset(10.0))

        got = row(table.rows(), "researcher", "answer")
        estimate = {0.5: got.p50_ms, 0.99: got.p99_ms}.get(q)
        if estimate is None:  # p90: straight from the merged histogram
            buckets = [0] * 22
            for v in values:
                buckets[bisect_left(BUCKET_BOUNDS_S, v)] += 1
            estimate = quantile_ms(buckets, q)
        assert estimate is not None
        truth = sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000
        i = bisect_left(BUCKET_BOUNDS_MS, truth)
        lower = BUCKET_BOUNDS_MS[i - 1] if i else 0.0
        width = BUCKET_BOUNDS_MS[i] - lower
        assert abs(estimate - truth) <= width


class TestSignalTable:
    def test_merges_instances_and_callers(self) -> None:
        """Two instances of one callee: the total row sums them; per-caller rows split them."""
        table = SignalTable(clock=FakeClock())
        table.add(
            report(
                "researcher",
                "r1",
                [
                    ("planner", "researcher", "answer", 90, 10, 0.002),
                    ("cli", "researcher", "answer", 10, 0, 0.004),
                ],
            )
        )
        table.add(report("researcher", "r2", [("planner", "researcher", "answer", 100, 0, 0.002)]))

        rows = table.rows()

        total = row(rows, "researcher", "answer")
        assert (total.requests, total.errors) == (210, 10)
        assert total.rps == pytest.approx(21.0)  # 10 rps + 11 rps from the two instances
        planner = row(rows, "researcher", "answer", "planner")
        assert planner.requests == 200
        assert planner.rps == pytest.approx(20.0)
        assert planner.success_rate == pytest.approx(190 / 200)
        assert row(rows, "researcher", "answer", "cli").requests == 10
        assert [(r.caller) for r in rows] == ["*", "cli", "planner"]
        assert [r.caller for r in table.rows(by_caller=False)] == ["*"]

    def test_rate_over_the_window_with_an_injected_clock(self) -> None:
        """An instance reporting 100 requests every 10 s runs at 10 rps, from its first report
        on and while its reports fill and slide through the window."""
        clock = FakeClock()
        table = SignalTable(window=60.0, clock=clock)
        stats = EdgeStats("researcher", "r1", now=clock.now)
        rates = []
        for _ in range(12):
            clock.advance(10.0)
            for _ in range(100):
                stats.record("planner", "researcher", "answer", "server", "OK", 0.002)
            table.add(stats.snapshot_and_reset(clock.now))
            rates.append(row(table.rows(), "researcher", "answer").rps)

        assert rates == pytest.approx([10.0] * 12)
        # 6 reports arrived in the last 60 s (the one exactly 60 s old has left).
        assert row(table.rows(), "researcher", "answer").requests == 600

    def test_rate_divides_by_the_window_not_by_the_reports_with_traffic(self) -> None:
        """One request in a minute is 1/60 rps: instances send no report for an interval
        without traffic, so the rate divides by the time covered, not by the 5 s of the one
        report that came."""
        clock = FakeClock()
        table = SignalTable(window=60.0, clock=clock)
        stats = EdgeStats("researcher", "r1", now=clock.now)
        for tick in range(12):  # a report every 5 s, published only when it holds traffic
            clock.advance(5.0)
            if tick == 0:
                stats.record("planner", "researcher", "answer", "server", "OK", 0.002)
            snapshot = stats.snapshot_and_reset(clock.now)
            if snapshot.edges:
                table.add(snapshot)
        clock.advance(0.5)  # the one report arrived 55.5 s ago: still in the window

        total = row(table.rows(), "researcher", "answer")
        [edge] = table.edges()

        assert total.requests == 1
        assert total.rps == pytest.approx(1 / 60)
        assert edge.rps == pytest.approx(1 / 60)
        assert table.covered() == 60.0

    def test_a_young_table_divides_by_the_time_since_its_first_report(self) -> None:
        """Before the table is a window old, the rate is over the time since the start of the
        first report it took (so a registry that just started shows the right rate)."""
        clock = FakeClock()
        table = SignalTable(window=60.0, clock=clock)
        assert table.covered() == 0.0
        table.add(report("researcher", "r1", [("planner", "researcher", "answer", 50, 0, 0.002)]))
        clock.advance(15.0)  # that report covered 10 s before it arrived: 25 s so far

        total = row(table.rows(), "researcher", "answer")

        assert table.covered() == pytest.approx(25.0)
        assert total.rps == pytest.approx(50 / 25)

    def test_success_rate_with_a_mix_of_codes(self) -> None:
        stats = EdgeStats("researcher", "r1", now=0.0)
        for code, n in (("OK", 85), ("UNAVAILABLE", 5), ("INTERNAL", 4), ("DEADLINE_EXCEEDED", 6)):
            for _ in range(n):
                stats.record("planner", "researcher", "answer", "server", code, 0.01)
        rep = stats.snapshot_and_reset(10.0)
        table = SignalTable(clock=FakeClock())
        table.add(rep)

        total = row(table.rows(), "researcher", "answer")

        assert rep.edges[0].codes == {"UNAVAILABLE": 5, "INTERNAL": 4, "DEADLINE_EXCEEDED": 6}
        assert total.success_rate == pytest.approx(0.85)
        assert (total.requests, total.errors) == (100, 15)

    def test_old_reports_leave_the_window(self) -> None:
        clock = FakeClock()
        table = SignalTable(window=60.0, clock=clock)
        table.add(report("researcher", "r1", [("planner", "researcher", "answer", 50, 0, 0.002)]))
        clock.advance(30.0)
        table.add(report("librarian", "l1", [("researcher", "librarian", "lookup", 20, 0, 0.001)]))

        clock.advance(31.0)  # the first report is 61 s old now
        rows = table.rows()

        assert [(r.callee, r.caller) for r in rows] == [
            ("librarian", "*"),
            ("librarian", "researcher"),
        ]
        assert table.instances() == [("librarian", "l1")]
        clock.advance(30.0)
        assert table.rows() == []
        assert table.edges() == []

    def test_inflight_comes_from_each_instances_latest_report(self) -> None:
        clock = FakeClock()
        table = SignalTable(clock=clock)
        table.add(report("r", "r1", [("p", "r", "e", 10, 0, 0.01)], inflight=5))
        clock.advance(10)
        table.add(report("r", "r1", [("p", "r", "e", 10, 0, 0.01)], inflight=2))
        table.add(report("r", "r2", [], inflight=0))
        table.add(report("r", "r3", [("p", "r", "e", 0, 0, 0.01)], inflight=3))

        total = row(table.rows(), "r", "e")

        assert (total.inflight, total.requests) == (5, 20)

    def test_reporter_selects_the_view(self) -> None:
        """Client reports (the caller's view) and server reports (the callee's) stay apart."""
        table = SignalTable(clock=FakeClock())
        table.add(
            report(
                "planner",
                "p1",
                [("planner", "researcher", "answer", 8, 2, 0.01)],
                reporter="client",
            )
        )
        table.add(report("researcher", "r1", [("planner", "researcher", "answer", 8, 0, 0.01)]))

        assert row(table.rows("client"), "researcher", "answer").success_rate == pytest.approx(0.8)
        assert row(table.rows("server"), "researcher", "answer").success_rate == 1.0
        assert [e.success_rate for e in table.edges("client")] == [pytest.approx(0.8)]

    def test_edges_sum_endpoints_per_caller_callee_pair(self) -> None:
        table = SignalTable(clock=FakeClock())
        table.add(
            report(
                "researcher",
                "r1",
                [
                    ("planner", "researcher", "answer", 40, 0, 0.002),
                    ("planner", "researcher", "cite", 10, 10, 0.002),
                    ("cli", "researcher", "answer", 5, 0, 0.002),
                ],
            )
        )
        table.add(report("librarian", "l1", [("researcher", "librarian", "lookup", 30, 0, 0.05)]))

        edges = {(e.caller, e.callee): e for e in table.edges()}

        assert sorted(edges) == [
            ("cli", "researcher"),
            ("planner", "researcher"),
            ("researcher", "librarian"),
        ]
        pr = edges[("planner", "researcher")]
        assert pr.requests == 60
        assert pr.rps == pytest.approx(6.0)
        assert pr.success_rate == pytest.approx(50 / 60)
        p99 = edges[("researcher", "librarian")].p99_ms
        assert p99 is not None and 25.6 < p99 <= 51.2  # 50 ms sits in (25.6 ms, 51.2 ms]

    def test_reports_with_other_bounds_are_rebinned(self) -> None:
        """A report from a future version with coarser buckets still merges (approximately)."""
        table = SignalTable(clock=FakeClock())
        coarse = EdgeReport(
            agent="r",
            instance="r1",
            interval_s=10,
            at=0,
            bucket_bounds_ms=[1.0, 10.0, 100.0],
            edges=[
                EdgeSample(
                    caller="p",
                    callee="r",
                    endpoint="e",
                    reporter="server",
                    requests=4,
                    buckets=[0, 4],
                )
            ],
        )
        table.add(coarse)

        p50 = row(table.rows(), "r", "e").p50_ms

        assert p50 is not None and 1.0 < p50 <= 12.8  # lands in our bucket that holds 10 ms

    def test_window_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="window"):
            SignalTable(window=0)


class TestTrafficRows:
    def test_latest_report_of_each_caller_gives_its_circuits_and_ejections(self) -> None:
        """Only a caller's newest report counts (a circuit that closed since is gone), sorted
        by caller, kind and target; reports out of the window are forgotten."""
        clock = FakeClock()
        table = SignalTable(window=60, clock=clock)

        def traffic(
            instance: str, at: float, circuits: dict[str, str], ejected: dict[str, float]
        ) -> EdgeReport:
            return EdgeReport(
                agent="planner", instance=instance, interval_s=5, at=at, circuits=circuits,
                ejected=ejected,
            )  # fmt: skip

        table.add(traffic("p1", 1.0, {"researcher (researcher.*)": "open"}, {}))
        table.add(traffic("p1", 2.0, {}, {"researcher.r2": 25.0}))
        table.add(traffic("p0", 1.5, {"writer (writer.draft)": "half_open"}, {}))
        rows = [(r.caller, r.kind, r.target, r.state, r.seconds_left) for r in table.traffic()]
        assert rows == [
            ("planner.p0", "circuit", "writer (writer.draft)", "half_open", None),
            ("planner.p1", "ejection", "researcher.r2", "ejected", 25.0),
        ]
        clock.advance(61)
        assert table.traffic() == []

    def test_of_two_reports_at_one_time_the_later_received_counts(self) -> None:
        """Two reports of one instance with the same ``at``: the one received last is newest."""
        table = SignalTable(window=60, clock=FakeClock())
        for state in ("open", "half_open"):
            table.add(
                EdgeReport(
                    agent="planner", instance="p1", interval_s=5, at=1.0,
                    circuits={"researcher (researcher.*)": state},
                )
            )  # fmt: skip

        assert [r.state for r in table.traffic()] == ["half_open"]
