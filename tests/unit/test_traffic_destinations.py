"""The caller's per-destination state (``mesh._runtime.traffic``): one circuit and one outlier
detector per agent and endpoints key, kept across policy revisions while the settings stay
the same."""

from __future__ import annotations

from typing import Any

from mesh._core.policy import PolicyEngine, parse_policy
from mesh._runtime.traffic import Traffic

POLICY = """apiVersion: mesh/v1
kind: Policy
metadata: {{name: t}}
spec:
  endpoints:
    researcher.*: {{circuit_breaker: {{consecutive_failures: {n}}}}}
    writer.*: {{outlier_detection: {{}}}}
    plain.*: {{timeout: 5s}}
"""


def route(n: int, agent: str = "researcher", endpoint: str = "answer") -> Any:
    return PolicyEngine(parse_policy(POLICY.format(n=n))).route("a", (), agent, endpoint)


def test_one_state_per_agent_and_endpoints_key() -> None:
    """Two endpoints under one key share a circuit; a key without circuit or outliers has no
    state at all."""
    traffic = Traffic(None)  # type: ignore[arg-type]  # destinations need no pipeline
    answer = traffic.destination(route(3), "researcher")
    lookup = traffic.destination(route(3, endpoint="lookup"), "researcher")
    assert answer is not None and answer is lookup and answer.name == "researcher (researcher.*)"
    assert answer.breaker is not None and answer.outliers is None
    writer = traffic.destination(route(3, agent="writer"), "writer")
    assert writer is not None and writer.breaker is None and writer.outliers is not None
    assert traffic.destination(route(3, agent="plain"), "plain") is None


def test_state_survives_a_new_revision_with_the_same_settings_only() -> None:
    """An open circuit stays open through a revision that keeps its settings, and starts
    closed again under changed ones."""
    traffic = Traffic(None)  # type: ignore[arg-type]
    first = traffic.destination(route(3), "researcher")
    assert first is not None and first.breaker is not None
    for _ in range(3):
        first.breaker.record(True)
    assert first.breaker.state == "open"
    same = traffic.destination(route(3), "researcher")  # another revision, equal settings
    assert same is first and same.breaker is not None and same.breaker.state == "open"
    changed = traffic.destination(route(4), "researcher")
    assert changed is not None and changed is not first
    assert changed.breaker is not None and changed.breaker.state == "closed"
