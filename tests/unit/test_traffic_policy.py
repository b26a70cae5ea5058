"""Traffic management in the policy language: what ``spec.routes`` and the new endpoint settings
accept and refuse (with the line and the fix), what the engine resolves per call, and the request
metadata the envelope carries."""

from __future__ import annotations

import json
import math
import re

import msgpack
import pytest
from jsonschema import Draft202012Validator

from mesh._core.envelope import (
    MAGIC,
    MAX_METADATA,
    MAX_METADATA_VALUE,
    PREFIX,
    check_metadata,
    decode_frame,
)
from mesh._core.policy import (
    PolicyEngine,
    PolicyError,
    Subset,
    canonical_policy_bytes,
    diff_policies,
    parse_canonical,
    parse_policy,
    policy_schema,
    policy_text,
)
from mesh.errors import DecodeError, InvalidArgument

HEAD = """apiVersion: mesh/v1
kind: Policy
metadata: {name: t}
spec:
"""


def policy(body: str):  # type: ignore[no-untyped-def]
    return parse_policy(HEAD + body, "t.yaml", require_units=True)


def error(body: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        policy(body)
    return info.value


def route(extra: str) -> str:
    return "  routes:\n    - name: r\n      match: {agent: researcher}\n" + extra


# --- what validation refuses -------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(90, 9), (90, 11), (50, 51)])
def test_split_weights_must_sum_to_100(weights: tuple[int, int]) -> None:
    """Weights that sum to anything but 100 are refused at the split's line, with the sum."""
    a, b = weights
    err = error(
        route(
            f"      split:\n        - {{version: '1', weight: {a}}}\n"
            f"        - {{version: '2', weight: {b}}}\n"
        )
    )
    assert err.line == 8
    assert err.problem == f"split weights must sum to 100, not {a} + {b} = {a + b}"


def test_split_of_exactly_100_is_accepted() -> None:
    """90 + 10 is a split."""
    p = policy(route("      split: [{version: '1', weight: 90}, {version: '2', weight: 10}]\n"))
    assert [b.weight for b in p.spec.routes[0].split] == [90, 10]


def test_a_backend_names_a_version_or_labels() -> None:
    """A backend with only a weight names no instances."""
    err = error(route("      split: [{weight: 100}]\n"))
    assert err.problem == "a split backend needs a version, labels or both"


def test_a_split_naming_one_subset_twice_is_refused() -> None:
    """Two backends for the same version are one backend written twice."""
    err = error(route("      split: [{version: '1', weight: 50}, {version: '1', weight: 50}]\n"))
    assert err.problem == "split names version 1 twice"
    assert err.path == "spec.routes[0].split[1]"


@pytest.mark.parametrize("weight", [101, -1])
def test_a_weight_outside_0_to_100_is_refused(weight: int) -> None:
    """Each weight is itself a percentage."""
    err = error(route(f"      split: [{{version: '1', weight: {weight}}}]\n"))
    assert err.path == "spec.routes[0].split[0].weight"


@pytest.mark.parametrize("percent", ["100.1", "-0.5", "true", "'20'"])
def test_percentages_outside_0_to_100_or_not_numbers_are_refused(percent: str) -> None:
    """A mirror's percent: a number from 0 to 100, not a bool or a string."""
    err = error(route(f"      mirror: {{agent: shadow, percent: {percent}}}\n"))
    assert err.path == "spec.routes[0].mirror.percent"
    assert err.problem.startswith("invalid percentage")
    assert err.problem.endswith("use a number from 0 to 100")


@pytest.mark.parametrize("percent", ["0", "100", "0.5"])
def test_percentages_at_the_bounds_are_accepted(percent: str) -> None:
    """0 and 100 are percentages."""
    p = policy(route(f"      mirror: {{agent: shadow, percent: {percent}}}\n"))
    mirror = p.spec.routes[0].mirror
    assert mirror is not None and mirror.percent == float(percent)


def test_a_mirror_to_the_routes_own_agent_is_refused() -> None:
    """Mirroring researcher's calls to researcher itself doubles them: name a shadow."""
    err = error(route("      mirror: {agent: researcher}\n"))
    assert err.path == "spec.routes[0].mirror"
    assert err.line == 8
    assert "the mirror is the route's own agent 'researcher'" in err.problem
    assert "name another agent, or the version or labels of a shadow deployment" in err.problem


def test_a_mirror_to_a_subset_the_split_uses_is_refused() -> None:
    """A shadow that already takes live calls from the split is no shadow."""
    err = error(
        route(
            "      split: [{version: '1', weight: 90}, {version: '2', weight: 10}]\n"
            "      mirror: {agent: researcher, version: '2'}\n"
        )
    )
    assert err.problem == (
        "the mirror (version 2) may take live calls from the split's version 2: mirror to a "
        "shadow deployment the split does not use"
    )


@pytest.mark.parametrize(
    ("backend", "mirror"),
    [("version: '2.*'", "version: '2.0.0'"), ("version: '2.0.0'", "version: '2.*'"),
     ("labels: {track: canary}", "version: '9'")],
)  # fmt: skip
def test_a_mirror_that_a_live_backend_may_cover_is_refused(backend: str, mirror: str) -> None:
    """A glob on either side, or a backend by labels that any version may carry: the shadow
    might take live calls."""
    err = error(
        route(
            f"      split: [{{version: '1', weight: 90}}, {{{backend}, weight: 10}}]\n"
            f"      mirror: {{agent: researcher, {mirror}}}\n"
        )
    )
    assert "may take live calls from the split's" in err.problem


def test_a_mirror_to_the_routes_own_agent_needs_a_split() -> None:
    """Without a split every instance of the agent, the shadow's too, takes live calls."""
    err = error(route("      mirror: {agent: researcher, version: '3'}\n"))
    assert err.problem == (
        "the mirror (version 3) is part of the route's own agent, which takes the route's live "
        "calls on every instance: add a split that sends none to it, or mirror to another agent"
    )


def test_backends_differing_only_in_label_order_are_one() -> None:
    """Labels are a map: their order does not make another backend."""
    err = error(
        route(
            "      split: [{labels: {a: '1', b: '2'}, weight: 50},"
            " {labels: {b: '2', a: '1'}, weight: 50}]\n"
        )
    )
    assert err.problem == "split names labels a=1,b=2 twice"


def test_a_mirror_to_an_unused_subset_of_the_same_agent_is_accepted() -> None:
    """A shadow deployment of the same agent: a version the split gives no weight."""
    p = policy(
        route(
            "      split: [{version: '1', weight: 100}, {version: '2', weight: 0}]\n"
            "      mirror: {agent: researcher, version: '2', percent: 20}\n"
        )
    )
    assert p.spec.routes[0].mirror is not None


def test_a_fault_needs_a_delay_or_an_abort() -> None:
    """An empty fault injects nothing: refused."""
    err = error(route("      fault: {}\n"))
    assert err.problem == "a fault needs a delay, an abort or both"


def test_an_abort_code_must_be_a_mesh_error_code() -> None:
    """Abort codes are the mesh's (``OK`` is not an error)."""
    err = error(route("      fault: {abort: {percent: 5, code: OK}}\n"))
    assert err.path == "spec.routes[0].fault.abort.code"
    assert "'UNAVAILABLE'" in err.problem and "(got 'OK')" in err.problem


def test_a_delay_needs_a_unit() -> None:
    """``fixed: 2`` in a file is refused like every other duration without a unit."""
    err = error(route("      fault: {delay: {percent: 5, fixed: 2}}\n"))
    assert err.problem == "invalid duration 2: add a unit, e.g. 2s"


@pytest.mark.parametrize("value", ["key", "metadata.", "metadata.Bad", "idempotency"])
def test_hash_on_is_idempotency_key_or_a_metadata_key(value: str) -> None:
    """Affinity hashes on the idempotency key or one metadata key, nothing else."""
    err = error(route(f"      hash_on: {value}\n"))
    assert err.path == "spec.routes[0].hash_on"
    assert err.problem == (f"invalid hash_on {value!r}: use idempotency_key or metadata.<key>")


@pytest.mark.parametrize("value", ["idempotency_key", "metadata.conversation"])
def test_hash_on_accepts_its_two_forms(value: str) -> None:
    """The two forms of affinity."""
    assert policy(route(f"      hash_on: {value}\n")).spec.routes[0].hash_on == value


def test_route_names_are_unique() -> None:
    """Two routes of one name: the second is reported, pointing at the first."""
    err = error(
        "  routes:\n    - {name: r, match: {agent: a}}\n    - {name: r, match: {agent: b}}\n"
    )
    assert err.problem == "duplicate route name 'r' (first used by spec.routes[0])"
    assert err.path == "spec.routes[1].name"


def test_a_route_names_one_plain_agent() -> None:
    """Splits name versions of one agent: a route's agent is a name, not a glob."""
    err = error("  routes:\n    - {name: r, match: {agent: 'res*'}}\n")
    assert err.path == "spec.routes[0].match.agent"


def endpoint(settings: str) -> str:
    return f"  endpoints:\n    researcher.answer:\n      {settings}\n"


def test_max_open_for_is_not_shorter_than_open_for() -> None:
    """An opening cannot be capped below its first length."""
    err = error(endpoint("circuit_breaker: {open_for: 10s, max_open_for: 5s}"))
    assert err.problem == "max_open_for must not be shorter than open_for"
    assert err.path == 'spec.endpoints["researcher.answer"].circuit_breaker.max_open_for'


def test_max_pending_needs_max_concurrent() -> None:
    """Waiting only exists behind a concurrency limit."""
    err = error(endpoint("circuit_breaker: {max_pending: 3}"))
    assert err.problem == "max_pending needs max_concurrent"


@pytest.mark.parametrize("field", ["consecutive_failures: 0", "max_concurrent: 0"])
def test_circuit_thresholds_are_at_least_one(field: str) -> None:
    """A circuit that opens after 0 failures, or takes no call at all, is refused."""
    err = error(endpoint(f"circuit_breaker: {{{field}}}"))
    assert "greater than or equal to 1" in err.problem


def test_max_ejection_time_is_not_shorter_than_the_base() -> None:
    """Ejections grow from the base up to the cap."""
    err = error(endpoint("outlier_detection: {base_ejection_time: 60s, max_ejection_time: 30s}"))
    assert err.problem == "max_ejection_time must not be shorter than base_ejection_time"


def test_an_unknown_load_balancer_is_refused() -> None:
    """Two balancers exist."""
    err = error(endpoint("load_balancer: round_robin"))
    assert "'least_outstanding' or 'peak_ewma'" in err.problem


# --- defaults and the canonical form -----------------------------------------------------------


def test_defaults_follow_envoy() -> None:
    """Empty blocks get Envoy's defaults: 5 failures, 30 s ejections up to 300 s, 10 %; a
    circuit opens for 1 s first, up to 60 s."""
    p = policy(
        "  endpoints:\n    researcher.answer: {circuit_breaker: {}, outlier_detection: {}}\n"
    )
    ep = p.spec.endpoints["researcher.answer"]
    assert ep.circuit_breaker is not None and ep.outlier_detection is not None
    cb, od = ep.circuit_breaker, ep.outlier_detection
    assert (cb.consecutive_failures, cb.open_for, cb.max_open_for) == (5, 1.0, 60.0)
    assert (cb.max_concurrent, cb.max_pending) == (None, None)
    assert (od.consecutive_failures, od.base_ejection_time, od.max_ejection_time) == (
        5,
        30.0,
        300.0,
    )
    assert od.max_ejection_percent == 10.0


def test_a_policy_without_traffic_settings_keeps_its_canonical_bytes() -> None:
    """No ``routes`` key and none of the new endpoint keys: the bytes signed before they
    existed stay the same."""
    p = policy(endpoint("timeout: 5s"))
    raw = canonical_policy_bytes(p)
    assert raw == (
        b'{"apiVersion":"mesh/v1","kind":"Policy","metadata":{"description":"","name":"t"},'
        b'"spec":{"defaults":{"access_log":false,"authorization":"deny","mode":"enforce",'
        b'"timeout":null},"endpoints":{"researcher.answer":{"access_log":null,"rate_limit":null,'
        b'"retries":null,"timeout":5.0}},"rules":[]}}'
    )


def test_routes_survive_the_canonical_form_and_the_written_text() -> None:
    """A policy with every traffic feature reads back equal from its canonical bytes and from
    the YAML ``policy_text`` writes."""
    p = policy(
        "  endpoints:\n    researcher.answer:\n"
        "      circuit_breaker: {max_concurrent: 4, max_pending: 2}\n"
        "      load_balancer: peak_ewma\n"
        "  routes:\n    - name: r\n"
        "      match: {agent: researcher, callers: [planner], metadata: {tier: gold}}\n"
        "      split: [{version: '1.*', weight: 80}, {labels: {track: canary}, weight: 20}]\n"
        "      hash_on: metadata.conversation\n      timeout: 250ms\n"
        "      retries: {attempts: 2}\n      mirror: {agent: shadow, percent: 12.5}\n"
        "      fault: {delay: {percent: 1, fixed: 2s}, abort: {percent: 2, code: INTERNAL}}\n"
    )
    assert parse_canonical(canonical_policy_bytes(p)) == p
    assert parse_policy(policy_text(p), require_units=True) == p


# --- the engine --------------------------------------------------------------------------------

ROUTES = (
    HEAD
    + """  defaults: {authorization: allow}
  endpoints:
    researcher.*: {circuit_breaker: {}, outlier_detection: {}}
    researcher.answer: {load_balancer: peak_ewma}
  routes:
    - name: gold
      match: {agent: researcher, endpoints: [answer], metadata: {tier: gold}}
      timeout: 1s
    - name: planners
      match: {agent: researcher, callers: [planner, "role:ops"]}
    - name: anyone
      match: {agent: researcher}
      fault: {abort: {percent: 1, code: UNAVAILABLE}}
"""
)


def engine() -> PolicyEngine:
    return PolicyEngine(parse_policy(ROUTES))


def test_routes_are_those_whose_callers_agent_and_endpoints_match_in_file_order() -> None:
    """A route for other callers or endpoints is not among a call's."""
    e = engine()
    names = lambda r: [t.name for t in r.traffic]  # noqa: E731
    assert names(e.route("planner", (), "researcher", "answer")) == ["gold", "planners", "anyone"]
    assert names(e.route("alice", ("ops",), "researcher", "answer")) == [
        "gold",
        "planners",
        "anyone",
    ]
    assert names(e.route("alice", (), "researcher", "answer")) == ["gold", "anyone"]
    assert names(e.route("alice", (), "researcher", "lookup")) == ["anyone"]
    assert names(e.route("alice", (), "writer", "answer")) == []


def test_the_first_route_whose_metadata_matches_applies() -> None:
    """Every metadata key a route names must have its value; a route without any matches all."""
    r = engine().route("alice", (), "researcher", "answer")
    selected = r.select({"tier": "gold", "other": "x"})
    assert selected is not None and selected.name == "gold"
    for md in (None, {}, {"tier": "silver"}):
        chosen = r.select(md)
        assert chosen is not None and chosen.name == "anyone"


def test_no_route_matches_a_call_with_no_route() -> None:
    """A policy without routes selects none: the call goes where it goes today."""
    r = PolicyEngine(policy("  defaults: {authorization: allow}\n")).route("a", (), "b", "c")
    assert r.traffic == () and r.select({"tier": "gold"}) is None


def test_the_destination_is_the_winning_endpoints_key_with_its_settings() -> None:
    """researcher.answer wins over researcher.*: its load balancer, and no circuit (settings
    are not merged across keys)."""
    e = engine()
    answer = e.route("a", (), "researcher", "answer")
    assert answer.destination == "researcher.answer"
    assert answer.load_balancer == "peak_ewma" and answer.circuit_breaker is None
    lookup = e.route("a", (), "researcher", "lookup")
    assert lookup.destination == "researcher.*" and lookup.load_balancer == "least_outstanding"
    assert lookup.circuit_breaker is not None and lookup.outlier_detection is not None


def test_features_name_the_stages_a_policy_needs() -> None:
    """Only what some rule uses: no mirror here, and nothing without a policy."""
    assert engine().features == {
        "routes",
        "fault",
        "circuit_breaker",
        "outlier_detection",
        "peak_ewma",
    }
    assert PolicyEngine(None).features == frozenset()
    assert PolicyEngine(policy("  defaults: {authorization: allow}\n")).features == frozenset()


def test_a_subset_matches_by_version_glob_and_all_labels() -> None:
    """Version by glob, and every label given."""
    s = Subset(version="2.*", labels={"track": "canary"})
    assert s.matches("2.1.0", {"track": "canary", "zone": "a"})
    assert not s.matches("2.1.0", {"track": "stable"})
    assert not s.matches("2.1.0", {})
    assert not s.matches("1.9.0", {"track": "canary"})
    assert Subset().matches("anything", {})
    assert s.describe() == "version 2.* labels track=canary"


# --- request metadata in the envelope ----------------------------------------------------------


def test_metadata_at_its_limits_is_accepted() -> None:
    """16 entries, 63-character keys, 256-character values."""
    check_metadata({f"{i:x}" + "k" * 61: "v" * MAX_METADATA_VALUE for i in range(MAX_METADATA)})


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({f"k{i}": "v" for i in range(MAX_METADATA + 1)}, "has 17 entries, at most 16"),
        ({"Tier": "x"}, "key 'Tier' must match"),
        ({"_x": "x"}, "key '_x' must match"),
        ({"k" * 64: "x"}, "must match"),
        ({"tier": "v" * (MAX_METADATA_VALUE + 1)}, "of 'tier' must be a string of at most 256"),
        ({"tier": 1}, "of 'tier' must be a string"),
    ],
)
def test_metadata_beyond_its_limits_is_refused(metadata: dict, message: str) -> None:  # type: ignore[type-arg]
    """Callers refuse it before sending, naming the rule."""
    with pytest.raises(InvalidArgument, match=message):
        check_metadata(metadata)


def _request(md: object) -> bytes:
    hdr = {
        "k": 1, "id": b"\x00" * 16, "ts": 0, "fa": "a", "fi": "i", "ta": "b", "ti": "j",
        "ep": "e", "dl": 0, "at": 1, "ct": b"", "md": md,
    }  # fmt: skip
    hb = msgpack.packb(hdr, use_bin_type=True)
    return PREFIX.pack(MAGIC, len(hb)) + hb


def test_a_received_header_with_bad_metadata_is_a_decode_error() -> None:
    """The decoder applies the same rules (a value that is not a string, too many entries)."""
    with pytest.raises(DecodeError, match="request metadata value of 'k' must be a string"):
        decode_frame(_request({"k": 1}))
    with pytest.raises(DecodeError, match="has 17 entries"):
        decode_frame(_request({f"k{i}": "v" for i in range(17)}))
    header, _ = decode_frame(_request({"tier": "gold"}))
    assert header.metadata == {"tier": "gold"}


# --- diffs -------------------------------------------------------------------------------------


def test_a_diff_names_route_and_endpoint_traffic_changes_field_by_field() -> None:
    """Routes by name (added, changed, removed, reordered) and the new endpoint settings, in
    the units a file writes."""
    old = policy(
        "  endpoints:\n    r.*: {circuit_breaker: {consecutive_failures: 3}}\n"
        "  routes:\n    - {name: canary, match: {agent: r},"
        " split: [{version: '1', weight: 90}, {version: '2', weight: 10}]}\n"
        "    - {name: old, match: {agent: r}}\n    - {name: keep, match: {agent: q}}\n"
    )
    new = policy(
        "  endpoints:\n    r.*: {circuit_breaker: {consecutive_failures: 5, open_for: 2s},"
        " load_balancer: peak_ewma}\n"
        "  routes:\n    - {name: keep, match: {agent: q}}\n"
        "    - {name: canary, match: {agent: r},"
        " split: [{version: '1', weight: 0}, {version: '2', weight: 100}]}\n"
        "    - {name: chaos, match: {agent: r}, fault: {delay: {percent: 1, fixed: 2s}}}\n"
    )
    assert diff_policies(old, new) == [
        "endpoint r.* changed: circuit_breaker.consecutive_failures 3 -> 5; "
        "circuit_breaker.open_for 1s -> 2s; load_balancer none -> peak_ewma",
        'route "canary" changed: split [{"version":"1","weight":90},{"version":"2","weight":10}]'
        ' -> [{"version":"1","weight":0},{"version":"2","weight":100}]',
        'route "chaos" added: match.callers=["*"] match.agent=r match.endpoints=["*"] '
        "fault.delay.percent=1 fault.delay.fixed=2s",
        'route "old" removed',
        "route order changed: canary, keep -> keep, canary",
    ]


# --- versions, percentages and thresholds at their bounds ---------------------------------------


def split_version(version: str) -> str:
    return route(f"      split: [{{version: {version}, weight: 100}}]\n")


@pytest.mark.parametrize(
    ("version", "shown"),
    [("''", "''"), ("'" + "v" * 65 + "'", repr("v" * 65)), ('"2.0\\t"', repr("2.0\t")), ("2", "2")],
)
def test_a_version_is_a_printable_string_of_1_to_64_characters(version: str, shown: str) -> None:
    """An empty, 65-character or unprintable version, or one that is not a string, is refused."""
    with pytest.raises(PolicyError, match=f"invalid version {re.escape(shown)}: use the version"):
        policy(split_version(version))


@pytest.mark.parametrize("version", ["'v'", "'" + "v" * 64 + "'"])
def test_versions_of_1_and_64_characters_are_accepted(version: str) -> None:
    """The shortest and the longest version."""
    p = policy(split_version(version))
    assert p.spec.routes[0].split[0].version == version.strip("'")


def test_the_largest_percentage_is_100() -> None:
    """100 is a percentage; the next float above it is not."""
    above = math.nextafter(100.0, math.inf)
    with pytest.raises(PolicyError, match=f"invalid percentage {re.escape(repr(above))}:"):
        policy(route(f"      mirror: {{agent: shadow, percent: {above!r}}}\n"))


def test_a_mirror_copies_every_call_by_default() -> None:
    """A mirror without percent copies 100 % of the route's calls."""
    mirror = policy(route("      mirror: {agent: shadow}\n")).spec.routes[0].mirror
    assert mirror is not None and mirror.percent == 100.0


@pytest.mark.parametrize("block", ["circuit_breaker", "outlier_detection"])
@pytest.mark.parametrize("failures", [1, 10_000])
def test_failure_thresholds_from_1_to_10000_are_accepted(block: str, failures: int) -> None:
    """One failure, or ten thousand, may open a circuit or eject an instance."""
    p = policy(endpoint(f"{block}: {{consecutive_failures: {failures}}}"))
    spec = getattr(p.spec.endpoints["researcher.answer"], block)
    assert spec.consecutive_failures == failures


@pytest.mark.parametrize("block", ["circuit_breaker", "outlier_detection"])
def test_a_failure_threshold_above_10000_is_refused(block: str) -> None:
    """10001 failures in a row is refused."""
    with pytest.raises(PolicyError, match="less than or equal to 10000"):
        policy(endpoint(f"{block}: {{consecutive_failures: 10001}}"))


def test_one_concurrent_attempt_and_no_pending_call_are_accepted() -> None:
    """max_concurrent 1 with max_pending 0: one attempt in flight, none waiting."""
    p = policy(endpoint("circuit_breaker: {max_concurrent: 1, max_pending: 0}"))
    cb = p.spec.endpoints["researcher.answer"].circuit_breaker
    assert cb is not None and (cb.max_concurrent, cb.max_pending) == (1, 0)


def test_a_negative_max_pending_is_refused() -> None:
    """max_pending -1 is refused."""
    with pytest.raises(PolicyError, match="greater than or equal to 0"):
        policy(endpoint("circuit_breaker: {max_concurrent: 1, max_pending: -1}"))


def test_max_open_for_equal_to_open_for_is_accepted() -> None:
    """An opening that never grows: max_open_for equal to open_for."""
    p = policy(endpoint("circuit_breaker: {open_for: 5s, max_open_for: 5s}"))
    cb = p.spec.endpoints["researcher.answer"].circuit_breaker
    assert cb is not None and cb.max_open_for == cb.open_for == 5.0


def test_max_ejection_time_equal_to_the_base_is_accepted() -> None:
    """Ejections that never grow: max_ejection_time equal to base_ejection_time."""
    p = policy(endpoint("outlier_detection: {base_ejection_time: 1m, max_ejection_time: 60s}"))
    od = p.spec.endpoints["researcher.answer"].outlier_detection
    assert od is not None and od.max_ejection_time == od.base_ejection_time == 60.0


# --- subsets ------------------------------------------------------------------------------------


def test_a_plain_version_matches_only_itself() -> None:
    """A version without wildcards matches that version, not another."""
    s = Subset(version="2.0.0")
    assert s.matches("2.0.0", {})
    assert not s.matches("2.0.1", {})


def test_a_subset_with_labels_only_matches_any_version() -> None:
    """No version given: only the labels decide."""
    s = Subset(labels={"track": "canary"})
    assert s.matches("9.9.9", {"track": "canary"})


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ({"version": "1"}, {"version": "2"}, False),
        ({"version": "1"}, {"version": "1"}, True),
        ({"version": "1.*"}, {"version": "2.0"}, False),
        ({"version": "2.0"}, {"version": "1.*"}, False),
        ({"version": "2.*"}, {"version": "2.0"}, True),
        ({"version": "2.0"}, {"version": "2.*"}, True),
        ({"version": "1.*"}, {"version": "2.*"}, False),
        ({"version": "2.*"}, {"version": "2.1*"}, True),
        ({"version": "2.1?"}, {"version": "2.*"}, True),
        ({"version": "*"}, {"version": "2.*"}, True),
        ({"version": "1"}, {}, True),
        ({}, {"version": "1"}, True),
    ],
)
def test_subsets_may_overlap_by_version(a: dict, b: dict, overlap: bool) -> None:  # type: ignore[type-arg]
    """Different plain versions never overlap; a glob overlaps the versions it matches; two
    globs do unless their literal beginnings differ; no version on one side always does."""
    assert Subset(**a).may_overlap(Subset(**b)) is overlap


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ({"track": "canary"}, {"track": "stable"}, False),
        ({"track": "canary"}, {"track": "canary", "zone": "eu"}, True),
        ({"track": "canary"}, {"zone": "eu"}, True),
        ({}, {"track": "canary"}, True),
    ],
)
def test_subsets_overlap_unless_a_label_has_two_values(a: dict, b: dict, overlap: bool) -> None:  # type: ignore[type-arg]
    """Only a label given different values on the two sides keeps them apart."""
    assert Subset(labels=a).may_overlap(Subset(labels=b)) is overlap
    assert Subset(labels=b).may_overlap(Subset(labels=a)) is overlap


@pytest.mark.parametrize(
    ("subset", "text"),
    [
        (Subset(), "any instance"),
        (Subset(version="2.0.0"), "version 2.0.0"),
        (Subset(labels={"zone": "eu", "track": "canary"}), "labels track=canary,zone=eu"),
    ],
)
def test_a_subset_describes_itself(subset: Subset, text: str) -> None:
    """A version, sorted labels, or any instance when neither is given."""
    assert subset.describe() == text


def test_a_backend_of_weight_1_that_the_mirror_may_cover_is_refused() -> None:
    """Even 1 % of live calls on the mirror's subset makes it no shadow."""
    with pytest.raises(PolicyError, match="may take live calls from the split's version 2"):
        policy(
            route(
                "      split: [{version: '1', weight: 99}, {version: '2', weight: 1}]\n"
                "      mirror: {agent: researcher, version: '2'}\n"
            )
        )


def _schema_errors(data: dict) -> list[str]:  # type: ignore[type-arg]
    return [e.json_path for e in Draft202012Validator(policy_schema()).iter_errors(data)]


def test_the_schema_bounds_percentages_as_validation_does() -> None:
    """The schema takes 0 and 100 and refuses just outside them, as the parser does."""
    p = policy(route("      mirror: {agent: shadow, percent: 50}\n"))
    data = json.loads(canonical_policy_bytes(p))
    mirror = data["spec"]["routes"][0]["mirror"]
    for percent, errors in [(0, 0), (100, 0), (-0.5, 1), (100.5, 1)]:
        mirror["percent"] = percent
        assert len(_schema_errors(data)) == errors, percent


def test_the_schema_bounds_versions_as_validation_does() -> None:
    """The schema takes versions of 1 to 64 characters, as the parser does."""
    p = policy(split_version("'1'"))
    data = json.loads(canonical_policy_bytes(p))
    backend = data["spec"]["routes"][0]["split"][0]
    for version, errors in [("v", 0), ("v" * 64, 0), ("", 1), ("v" * 65, 1)]:
        backend["version"] = version
        assert len(_schema_errors(data)) == errors, version


@pytest.mark.parametrize(
    ("body", "features"),
    [
        (route(""), {"routes"}),
        (route("      mirror: {agent: shadow}\n"), {"routes", "mirror"}),
        (route("      fault: {abort: {percent: 1, code: INTERNAL}}\n"), {"routes", "fault"}),
        (endpoint("circuit_breaker: {}"), {"circuit_breaker"}),
        (endpoint("outlier_detection: {}"), {"outlier_detection"}),
        (endpoint("load_balancer: peak_ewma"), {"peak_ewma"}),
        (endpoint("load_balancer: least_outstanding"), set()),
        (endpoint("timeout: 1s"), set()),
    ],
)
def test_each_feature_is_named_only_when_used(body: str, features: set[str]) -> None:
    """One setting names its one stage; a route or an endpoint key without it names none."""
    assert PolicyEngine(policy(body)).features == features


def test_a_diff_writes_non_ascii_text_as_it_is() -> None:
    """A label value outside ASCII shows as written in a changed split, not as an escape."""
    old = policy(route("      split: [{labels: {team: 'ø'}, weight: 100}]\n"))
    new = policy(route("      split: [{labels: {team: 'é'}, weight: 100}]\n"))

    assert diff_policies(old, new) == [
        'route "r" changed: split [{"labels":{"team":"ø"},"weight":100}]'
        ' -> [{"labels":{"team":"é"},"weight":100}]'
    ]


def test_the_abort_codes_are_the_mesh_error_codes() -> None:
    """A fault may abort with any code the mesh's errors carry, and no other."""
    from typing import get_args

    from mesh._core.policy.model import AbortCode
    from mesh.errors import CODES

    assert set(get_args(AbortCode)) == CODES
