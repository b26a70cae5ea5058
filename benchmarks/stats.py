"""Percentiles of latency samples and medians of rounds."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

__all__ = ["median_of_rounds", "percentile", "summarize_ns"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ns(latencies_ns: Iterable[int]) -> dict[str, float]:
    """p50/p99/p99.9 in milliseconds of latency samples in nanoseconds."""
    ms = sorted(v / 1e6 for v in latencies_ns)
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "samples": float(len(ms)),
    }


def median_of_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per metric, the median over the rounds that measured it."""
    keys: list[str] = []
    for r in rounds:
        keys.extend(k for k in r if k not in keys)
    return {k: statistics.median([r[k] for r in rounds if k in r]) for k in keys}
