"""Golden signals per edge: requests, errors, latency and in-flight calls between agents.

Pure core: no I/O, an injectable clock, no sleeps in tests.

Each agent instance keeps one ``EdgeStats``. The runtime calls ``record`` once per finished
request, as a client (after the last attempt of a call) and as a server (after its handler
ran); ``enter`` / ``exit`` keep the in-flight gauges. ``record`` costs about a microsecond: a
dict lookup keyed by ``(caller, callee, endpoint, reporter)``, three integer increments and a
``bisect`` into a fixed log-scale latency histogram. Every few seconds the instance publishes
``snapshot_and_reset(now)`` (an ``EdgeReport``: the counts since the last one) to the registry.

The registry feeds the reports into a ``SignalTable``, which keeps a sliding window (60 s by
default) and answers ``rows`` (for ``mesh-policy top``: rps, success rate, p50 / p99 and
in-flight per callee endpoint and per calling edge) and ``edges`` (for ``mesh-policy graph``).

Histogram: bucket ``i`` counts latencies ``bounds[i-1] < s <= bounds[i]`` (as Prometheus
``le`` buckets); the bounds run from 50 µs doubling to about 52 s, and one last bucket counts
everything slower. The bounds travel in every report, so they may change later: a table
re-bins reports whose bounds differ from its own.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "ALL_CALLERS",
    "BUCKET_BOUNDS_MS",
    "BUCKET_BOUNDS_S",
    "EdgeKey",
    "EdgeReport",
    "EdgeSample",
    "EdgeStats",
    "GraphEdge",
    "Reporter",
    "SignalRow",
    "SignalTable",
    "TrafficRow",
    "quantile_ms",
]

Reporter = Literal["client", "server"]
EdgeKey = tuple[str, str, str, Reporter]
"""``(caller, callee, endpoint, reporter)``."""

OK = "OK"
ALL_CALLERS = "*"
SIGNALS_TOPIC = "mesh-signals"  # the event topic agents report on

BUCKET_BOUNDS_S: tuple[float, ...] = tuple(50e-6 * 2**i for i in range(21))
"""Upper bounds of the latency buckets in seconds: 50 µs, 100 µs, ... about 52.4 s (21 bounds,
so 22 buckets with the overflow)."""
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(round(b * 1000, 6) for b in BUCKET_BOUNDS_S)
_NBUCKETS = len(BUCKET_BOUNDS_S) + 1

# Limits on what a report may carry (reports come over the wire into the registry).
MAX_EDGES_PER_REPORT = 4096
MAX_BUCKETS = 64
MAX_CODES = 32


class _Slot:
    """The counters of one edge since the instance started (they only grow)."""

    __slots__ = ("buckets", "codes", "error_seconds", "errors", "ok_seconds", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.ok_seconds = 0.0
        self.codes: dict[str, int] = {}  # error codes only
        self.error_seconds: dict[str, float] = {}
        self.buckets = [0] * _NBUCKETS

    def copy(self) -> _Slot:
        out = _Slot()
        out.requests, out.errors, out.ok_seconds = self.requests, self.errors, self.ok_seconds
        out.codes, out.error_seconds = dict(self.codes), dict(self.error_seconds)
        out.buckets = list(self.buckets)
        return out


_EMPTY = _Slot()


# --- wire models --------------------------------------------------------------------------------


class EdgeSample(BaseModel):
    """One edge's counts over a report's interval, as one instance saw them.

    ``codes`` holds the error codes only (the OK count is ``requests - errors``) and ``buckets``
    drops its trailing zeros, to keep reports small; readers pad with zeros.
    """

    caller: str
    callee: str
    endpoint: str
    reporter: Reporter
    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    codes: dict[str, int] = Field(default_factory=dict, max_length=MAX_CODES)
    buckets: list[int] = Field(default_factory=list, max_length=MAX_BUCKETS)
    inflight: int = Field(default=0, ge=0)


class EdgeReport(BaseModel):
    """What one agent instance publishes every few seconds: its edges since the last report."""

    agent: str
    instance: str
    interval_s: float = Field(ge=0)
    at: float
    edges: list[EdgeSample] = Field(default_factory=list, max_length=MAX_EDGES_PER_REPORT)
    bucket_bounds_ms: list[float] = Field(
        default_factory=lambda: list(BUCKET_BOUNDS_MS), max_length=MAX_BUCKETS
    )
    circuits: dict[str, str] = Field(default_factory=dict, max_length=MAX_EDGES_PER_REPORT)
    """The reporter's circuits that are not closed: destination -> ``open`` or ``half_open``."""
    ejected: dict[str, float] = Field(default_factory=dict, max_length=MAX_EDGES_PER_REPORT)
    """The instances the reporter has ejected (``agent.instance``) -> seconds left then."""


class SignalRow(BaseModel):
    """One line of ``mesh-policy top``: a callee endpoint over the window, either in total
    (``caller == "*"``) or for one calling agent."""

    callee: str
    endpoint: str
    caller: str
    rps: float
    success_rate: float | None
    """Share of requests with code OK, 0..1; ``None`` without requests in the window."""
    p50_ms: float | None
    p99_ms: float | None
    inflight: int
    requests: int
    errors: int


class TrafficRow(BaseModel):
    """A caller's traffic-management state, from its latest report in the window: a circuit
    that is not closed, or an instance it has ejected."""

    caller: str
    """The reporting instance, ``agent.instance``."""
    kind: Literal["circuit", "ejection"]
    target: str
    """The destination (``<agent> (<endpoints key>)``) or the ejected ``agent.instance``."""
    state: str
    """``open`` or ``half_open`` for a circuit; ``ejected`` for an ejection."""
    seconds_left: float | None = None
    """For an ejection: how long it had left when reported."""


class GraphEdge(BaseModel):
    """One caller -> callee edge of the dependency graph, over all endpoints of the callee."""

    caller: str
    callee: str
    requests: int
    rps: float
    success_rate: float | None
    p99_ms: float | None


# --- per instance -------------------------------------------------------------------------------


class EdgeStats:
    """The golden signals of one agent instance, per edge.

    The counters only grow (OpenTelemetry's observable instruments and the Prometheus
    collector read them through ``totals``, ``cumulative_buckets``, ``histograms`` and
    ``inflight_by_edge``); ``snapshot_and_reset`` reports what changed since the previous
    snapshot, for the registry.

    ``record``, ``enter``, ``exit`` and ``snapshot_and_reset`` run on the event loop's thread;
    the readers may run on a metrics exporter's thread (they copy before iterating, and
    every counter they read only grows).

    Args:
        agent: this instance's agent name.
        instance: this instance's id.
        now: unix time the counting starts (default: the current time).
    """

    __slots__ = ("_base", "_last", "_slots", "agent", "inflight", "instance")

    def __init__(self, agent: str, instance: str, now: float | None = None) -> None:
        self.agent = agent
        self.instance = instance
        self._last = time.time() if now is None else now
        self._slots: dict[EdgeKey, _Slot] = {}
        self._base: dict[EdgeKey, _Slot] = {}  # the counters at the last snapshot
        self.inflight: dict[EdgeKey, int] = {}
        """In-flight requests per edge (a gauge: snapshots do not reset it)."""

    def record(
        self,
        caller: str,
        callee: str,
        endpoint: str,
        reporter: Reporter,
        code: str,
        seconds: float,
    ) -> None:
        """Count one finished request (about a microsecond).

        Args:
            caller: the calling agent.
            callee: the called agent.
            endpoint: the callee's endpoint.
            reporter: ``"client"`` (the caller's view) or ``"server"`` (the callee's).
            code: ``"OK"`` or the error code.
            seconds: the request's duration.
        """
        key = (caller, callee, endpoint, reporter)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.requests += 1
        if code == OK:
            slot.ok_seconds += seconds
        else:
            slot.errors += 1
            codes = slot.codes
            codes[code] = codes.get(code, 0) + 1
            spent = slot.error_seconds
            spent[code] = spent.get(code, 0.0) + seconds
        slot.buckets[bisect_left(BUCKET_BOUNDS_S, seconds)] += 1

    def enter(self, key: EdgeKey) -> None:
        """A request on ``key`` = ``(caller, callee, endpoint, reporter)`` started."""
        inflight = self.inflight
        inflight[key] = inflight.get(key, 0) + 1

    def exit(self, key: EdgeKey) -> None:
        """A request on ``key`` ended (whatever its outcome)."""
        inflight = self.inflight
        left = inflight.get(key, 0) - 1
        if left > 0:
            inflight[key] = left
        else:
            inflight.pop(key, None)

    def finish(self, key: EdgeKey, code: str, seconds: float) -> None:
        """``exit(key)`` and ``record(*key, code, seconds)`` in one call."""
        self.exit(key)
        self.record(key[0], key[1], key[2], key[3], code, seconds)

    def snapshot_and_reset(self, now: float) -> EdgeReport:
        """The counts since the last snapshot (or since construction); the next snapshot
        counts from here. In-flight gauges are not reset: an edge with requests in flight but
        none finished appears with ``requests == 0``.

        Args:
            now: unix time of this snapshot; the report's interval is ``now`` minus the last.
        """
        interval = max(0.0, now - self._last)
        self._last = now
        edges: list[EdgeSample] = []
        inflight = self.inflight
        base = self._base
        for key in sorted(self._slots.keys() | inflight.keys()):
            slot = self._slots.get(key, _EMPTY)
            was = base.get(key, _EMPTY)
            requests = slot.requests - was.requests
            busy = inflight.get(key, 0)
            if not requests and not busy:
                continue
            caller, callee, endpoint, reporter = key
            sample = EdgeSample(
                caller=caller, callee=callee, endpoint=endpoint, reporter=reporter, inflight=busy
            )
            if requests:
                sample.requests = requests
                sample.errors = slot.errors - was.errors
                sample.codes = {
                    code: n - was.codes.get(code, 0)
                    for code, n in slot.codes.items()
                    if n != was.codes.get(code, 0)
                }
                buckets = [n - m for n, m in zip(slot.buckets, was.buckets, strict=True)]
                while buckets and not buckets[-1]:
                    buckets.pop()
                sample.buckets = buckets
                base[key] = slot.copy()
            edges.append(sample)
        return EdgeReport(
            agent=self.agent,
            instance=self.instance,
            interval_s=interval,
            at=now,
            edges=edges,
            bucket_bounds_ms=list(BUCKET_BOUNDS_MS),
        )

    # --- cumulative readers (for OpenTelemetry observable instruments) -------------------------

    def totals(self) -> list[tuple[EdgeKey, str, int, float]]:
        """``(key, code, requests, seconds)`` since the instance started, per edge and code."""
        out: list[tuple[EdgeKey, str, int, float]] = []
        for key, slot in sorted(list(self._slots.items())):
            ok = slot.requests - slot.errors
            if ok > 0:
                out.append((key, OK, ok, slot.ok_seconds))
            spent = dict(slot.error_seconds)
            for code, n in sorted(dict(slot.codes).items()):
                out.append((key, code, n, spent.get(code, 0.0)))
        return out

    def cumulative_buckets(self) -> list[tuple[EdgeKey, str, int]]:
        """``(key, le, requests at or under le seconds)`` per edge, Prometheus style: ``le``
        is the bound in seconds as text, ending with ``"+Inf"`` (the edge's total)."""
        out: list[tuple[EdgeKey, str, int]] = []
        for key, slot in sorted(list(self._slots.items())):
            running = 0
            for le, n in zip(_LE, list(slot.buckets), strict=True):
                running += n
                out.append((key, le, running))
        return out

    def histograms(self) -> list[tuple[EdgeKey, list[tuple[str, int]], float]]:
        """``(key, [(le, requests at or under le seconds), ..., ("+Inf", total)], seconds)``
        per edge: one Prometheus histogram per edge, whatever the codes. The count is the
        ``+Inf`` bucket, so it always matches the buckets (a reader on another thread may see
        the sum one request behind them)."""
        out: list[tuple[EdgeKey, list[tuple[str, int]], float]] = []
        for key, slot in sorted(list(self._slots.items())):
            running = 0
            cumulative: list[tuple[str, int]] = []
            for le, n in zip(_LE, list(slot.buckets), strict=True):
                running += n
                cumulative.append((le, running))
            seconds = slot.ok_seconds + sum(list(slot.error_seconds.values()))
            out.append((key, cumulative, seconds))
        return out

    def inflight_by_edge(self) -> list[tuple[EdgeKey, int]]:
        """``(key, requests in flight)`` for every edge seen (zero when none is in flight)."""
        inflight = dict(self.inflight)
        keys = set(list(self._slots)) | inflight.keys()
        return [(key, inflight.get(key, 0)) for key in sorted(keys)]


_LE: tuple[str, ...] = (*(f"{b:g}" for b in BUCKET_BOUNDS_S), "+Inf")


# --- aggregation in the registry ----------------------------------------------------------------


def quantile_ms(
    buckets: Sequence[int], q: float, bounds_ms: Sequence[float] = BUCKET_BOUNDS_MS
) -> float | None:
    """The ``q`` quantile (0..1) of a histogram in milliseconds, interpolating linearly inside
    the bucket it falls in; ``None`` for an empty histogram. A quantile in the overflow bucket
    is reported as the last bound (the histogram cannot say more)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count <= 0:
            continue
        if seen + count >= rank:
            if i >= len(bounds_ms):
                return float(bounds_ms[-1])
            lower = bounds_ms[i - 1] if i > 0 else 0.0
            upper = bounds_ms[i]
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return float(bounds_ms[-1])


class _Agg:
    """Sums over the window for one row."""

    __slots__ = ("buckets", "errors", "inflight", "requests", "rps")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.rps = 0.0
        self.inflight = 0
        self.buckets = [0] * _NBUCKETS

    def merge(self, other: _Agg) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.rps += other.rps
        self.inflight += other.inflight
        mine = self.buckets
        for i, count in enumerate(other.buckets):
            mine[i] += count

    @property
    def success_rate(self) -> float | None:
        if self.requests <= 0:
            return None
        return max(0.0, self.requests - self.errors) / self.requests

    def quantile(self, q: float) -> float | None:
        return quantile_ms(self.buckets, q)


class SignalTable:
    """Reports from many instances over a sliding window, summed into rows and graph edges.

    Rates: the requests in the window divided by the time the window covers, which is the
    window itself once the table is older than it, and before that the time since the start
    of the first report it took. Instances send no report for an interval without traffic,
    so the intervals of the reports received say nothing about the time that passed: one
    request in a minute is 1/60 rps, not one request over the 5 s that report covered.
    Latency quantiles come from the merged histograms; in-flight gauges from each instance's
    latest report.

    Args:
        window: seconds a report counts after it arrived.
        clock: unix seconds (reports are placed in the window by arrival, so clock skew
            between machines does not matter).
    """

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._clock = clock
        self._reports: list[tuple[float, EdgeReport]] = []
        self._remaps: dict[tuple[float, ...], list[int]] = {}
        self._since: float | None = None  # the start of the earliest report taken

    def add(self, report: EdgeReport) -> None:
        """Take one instance's report (stamped with the table's clock on arrival)."""
        now = self._clock()
        start = now - report.interval_s
        if self._since is None or start < self._since:
            self._since = start
        self._reports.append((now, report))

    def covered(self) -> float:
        """Seconds the rates are over: the window, or the time since the start of the first
        report when the table is younger than the window (0 before any report)."""
        if self._since is None:
            return 0.0
        return max(0.0, min(self.window, self._clock() - self._since))

    def _live(self) -> list[tuple[float, EdgeReport]]:
        # A report counts for ``window`` seconds after it arrived, the boundary excluded: with
        # a steady reporting period the reports in the window then hold one window of traffic.
        cutoff = self._clock() - self.window
        self._reports = [(t, r) for t, r in self._reports if t > cutoff]
        return self._reports

    def _remap(self, bounds_ms: list[float]) -> list[int] | None:
        """Indexes of our buckets for a report's buckets, or ``None`` when bounds match."""
        key = tuple(bounds_ms)
        if key == BUCKET_BOUNDS_MS:
            return None
        remap = self._remaps.get(key)
        if remap is None:
            remap = [bisect_left(BUCKET_BOUNDS_MS, b) for b in key]
            remap.append(_NBUCKETS - 1)  # their overflow bucket lands in ours
            if len(self._remaps) < 16:
                self._remaps[key] = remap
        return remap

    def _collect(self, reporter: Reporter) -> dict[tuple[str, str, str], _Agg]:
        """Sums per ``(callee, endpoint, caller)``."""
        live = self._live()
        span = max(self.covered(), 1e-3)
        latest: dict[tuple[str, str], tuple[float, EdgeReport]] = {}
        for arrived, rep in live:
            inst = (rep.agent, rep.instance)
            prev = latest.get(inst)
            if prev is None or (arrived, rep.at) >= (prev[0], prev[1].at):
                latest[inst] = (arrived, rep)
        out: dict[tuple[str, str, str], _Agg] = {}
        for _, rep in live:
            remap = self._remap(rep.bucket_bounds_ms)
            for s in rep.edges:
                if s.reporter != reporter or s.requests <= 0:
                    continue
                key = (s.callee, s.endpoint, s.caller)
                agg = out.get(key)
                if agg is None:
                    agg = out[key] = _Agg()
                agg.requests += s.requests
                agg.errors += min(s.errors, s.requests)
                agg.rps += s.requests / span
                buckets = agg.buckets
                if remap is None:
                    for i, count in enumerate(s.buckets[:_NBUCKETS]):
                        buckets[i] += max(0, count)
                else:
                    for i, count in enumerate(s.buckets[: len(remap)]):
                        buckets[remap[i]] += max(0, count)
        for _, rep in latest.values():
            for s in rep.edges:
                if s.reporter != reporter or s.inflight <= 0:
                    continue
                key = (s.callee, s.endpoint, s.caller)
                agg = out.get(key)
                if agg is None:
                    agg = out[key] = _Agg()
                agg.inflight += s.inflight
        return out

    def rows(self, reporter: Reporter = "server", *, by_caller: bool = True) -> list[SignalRow]:
        """Rows for ``top``: per callee endpoint a total (``caller == "*"``) followed, when
        ``by_caller``, by one row per calling agent; sorted by callee, endpoint, caller.

        Args:
            reporter: whose view to count: ``"server"`` (what callees served) or ``"client"``
                (what callers saw, including calls that reached no instance).
            by_caller: include the per-edge rows.
        """
        per_edge = self._collect(reporter)
        totals: dict[tuple[str, str], _Agg] = {}
        for (callee, endpoint, _), agg in per_edge.items():
            total = totals.get((callee, endpoint))
            if total is None:
                total = totals[(callee, endpoint)] = _Agg()
            total.merge(agg)
        callers: dict[tuple[str, str], list[str]] = {}
        for callee, endpoint, caller in per_edge:
            callers.setdefault((callee, endpoint), []).append(caller)
        rows: list[SignalRow] = []
        for callee, endpoint in sorted(totals):
            rows.append(_row(callee, endpoint, ALL_CALLERS, totals[(callee, endpoint)]))
            if by_caller:
                for caller in sorted(callers[(callee, endpoint)]):
                    rows.append(_row(callee, endpoint, caller, per_edge[callee, endpoint, caller]))
        return rows

    def edges(self, reporter: Reporter = "server") -> list[GraphEdge]:
        """The dependency graph: one edge per (caller, callee) over all endpoints, sorted."""
        pairs: dict[tuple[str, str], _Agg] = {}
        for (callee, _, caller), agg in self._collect(reporter).items():
            pair = pairs.get((caller, callee))
            if pair is None:
                pair = pairs[(caller, callee)] = _Agg()
            pair.merge(agg)
        return [
            GraphEdge(
                caller=caller,
                callee=callee,
                requests=agg.requests,
                rps=agg.rps,
                success_rate=agg.success_rate,
                p99_ms=agg.quantile(0.99),
            )
            for (caller, callee), agg in sorted(pairs.items())
        ]

    def traffic(self) -> list[TrafficRow]:
        """The open circuits and ejections of every instance, from its latest report in the
        window, sorted by caller, kind and target."""
        latest: dict[tuple[str, str], EdgeReport] = {}
        for _, rep in self._live():
            prev = latest.get((rep.agent, rep.instance))
            if prev is None or rep.at >= prev.at:
                latest[(rep.agent, rep.instance)] = rep
        rows: list[TrafficRow] = []
        for (agent, instance), rep in latest.items():
            caller = f"{agent}.{instance}"
            for dest, state in rep.circuits.items():
                rows.append(TrafficRow(caller=caller, kind="circuit", target=dest, state=state))
            for key, left in rep.ejected.items():
                rows.append(
                    TrafficRow(
                        caller=caller, kind="ejection", target=key, state="ejected",
                        seconds_left=left,
                    )
                )  # fmt: skip
        return sorted(rows, key=lambda r: (r.caller, r.kind, r.target))

    def instances(self) -> list[tuple[str, str]]:
        """``(agent, instance)`` of every instance with a report in the window."""
        return sorted({(r.agent, r.instance) for _, r in self._live()})


def _row(callee: str, endpoint: str, caller: str, agg: _Agg) -> SignalRow:
    return SignalRow(
        callee=callee,
        endpoint=endpoint,
        caller=caller,
        rps=agg.rps,
        success_rate=agg.success_rate,
        p50_ms=agg.quantile(0.5),
        p99_ms=agg.quantile(0.99),
        inflight=agg.inflight,
        requests=agg.requests,
        errors=min(agg.errors, agg.requests),
    )
