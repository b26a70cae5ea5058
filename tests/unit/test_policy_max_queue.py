"""``spec.endpoints.<key>.max_queue``: validation, canonical form, text, diff and routes."""

from __future__ import annotations

import json

import pytest

from mesh._core.policy import (
    PolicyEngine,
    PolicyError,
    canonical_policy_bytes,
    diff_policies,
    parse_canonical,
    parse_policy,
    policy_text,
)

BASE = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: shed}
spec:
  defaults: {authorization: allow}
  endpoints:
    worker.slow: {timeout: 20s%s}
"""


def _policy(extra: str = "") -> str:
    return BASE % extra


def test_max_queue_is_a_non_negative_integer() -> None:
    """0 and positive integers are accepted; negatives, floats and strings are refused."""
    assert parse_policy(_policy(", max_queue: 0")).spec.endpoints["worker.slow"].max_queue == 0
    assert parse_policy(_policy(", max_queue: 5")).spec.endpoints["worker.slow"].max_queue == 5
    for bad in ("-1", "2.5", '"5"'):
        with pytest.raises(PolicyError, match="max_queue"):
            parse_policy(_policy(f", max_queue: {bad}"))


def test_an_unset_max_queue_leaves_the_canonical_bytes_as_before() -> None:
    """A policy without max_queue has no such key: its bytes and signature do not change,
    and agents that predate the field still read it."""
    raw = canonical_policy_bytes(parse_policy(_policy()))
    assert b"max_queue" not in raw
    assert json.loads(raw)["spec"]["endpoints"]["worker.slow"] == {
        "access_log": None,
        "rate_limit": None,
        "retries": None,
        "timeout": 20.0,
    }


def test_a_set_max_queue_round_trips_through_canonical_bytes_and_text() -> None:
    """The canonical JSON and the YAML of ``mesh-policy get`` both carry it back."""
    policy = parse_policy(_policy(", max_queue: 5"))
    raw = canonical_policy_bytes(policy)
    assert json.loads(raw)["spec"]["endpoints"]["worker.slow"]["max_queue"] == 5
    assert parse_canonical(raw) == policy
    text = policy_text(policy)
    assert "max_queue: 5" in text
    assert parse_policy(text, require_units=True) == policy


def test_diff_names_a_max_queue_change() -> None:
    """diff reports the field being set, changed and removed."""
    none, five, nine = (parse_policy(_policy(x)) for x in ("", ", max_queue: 5", ", max_queue: 9"))
    assert diff_policies(none, five) == ["endpoint worker.slow changed: max_queue none -> 5"]
    assert diff_policies(five, nine) == ["endpoint worker.slow changed: max_queue 5 -> 9"]
    assert diff_policies(nine, none) == ["endpoint worker.slow changed: max_queue 9 -> none"]


def test_the_route_carries_max_queue() -> None:
    """The engine's route for a call has the winning entry's max_queue (None when unset)."""
    engine = PolicyEngine(parse_policy(_policy(", max_queue: 5")))
    assert engine.route("caller", frozenset(), "worker", "slow").max_queue == 5
    assert engine.route("caller", frozenset(), "worker", "other").max_queue is None
    assert PolicyEngine(None).route("caller", frozenset(), "worker", "slow").max_queue is None
