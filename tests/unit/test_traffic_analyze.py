"""Unit tests for mesh._core.policy.analyze on traffic routes: the agents, endpoints, roles,
versions and labels a route names that nothing live has."""

from __future__ import annotations

from mesh._core.policy import Finding, Inventory, analyze_policy, line_of, parse_policy
from mesh._core.records import EndpointInfo, InstanceRecord
from mesh.testing import Trust

HEADER = "apiVersion: mesh/v1\nkind: Policy\nmetadata: {name: test}\n"

LIVE = Inventory(
    endpoints={
        "planner": frozenset({"plan"}),
        "researcher": frozenset({"answer", "drop-cache"}),
        "shadow": frozenset({"answer"}),
    },
    roles=frozenset({"coordinator"}),
    versions={
        "planner": frozenset({"0.3.0"}),
        "researcher": frozenset({"1.2.0", "2.0.0"}),
        "shadow": frozenset({"2.0.0"}),
    },
    labels={
        "planner": frozenset(),
        "researcher": frozenset({("track", "canary"), ("zone", "eu")}),
        "shadow": frozenset({("track", "shadow")}),
    },
)


def route(body: str) -> str:
    """A spec with one route named "canary" to researcher's answer, and ``body`` under it."""
    return (
        "spec:\n  routes:\n    - name: canary\n"
        "      match: {callers: [planner], agent: researcher, endpoints: [answer]}\n" + body
    )


def findings(spec: str, inventory: Inventory = LIVE) -> list[str]:
    policy = parse_policy(HEADER + spec, source="p.yaml", require_units=True)
    return [f.message for f in analyze_policy(policy, inventory)]


def test_a_route_naming_only_live_things_has_no_findings() -> None:
    """Live callers, agent, endpoints, versions, labels and mirror are not reported."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 90}\n"
        "        - {version: 2.0.0, labels: {track: canary, zone: eu}, weight: 10}\n"
        "      mirror: {agent: shadow, labels: {track: shadow}, percent: 5}\n"
    )
    assert findings(spec) == []


def test_a_split_version_no_live_instance_has_is_reported_with_a_suggestion() -> None:
    """A backend's plain version that no instance of the route's agent announces is reported."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 90}\n"
        "        - {version: 3.0.0, weight: 10}\n"
    )
    assert findings(spec) == [
        'route "canary" names version "3.0.0" of agent "researcher", which no live instance '
        'has (did you mean "2.0.0"?)'
    ]


def test_a_version_another_agent_runs_is_still_reported() -> None:
    """Versions are looked up in the instances of the backend's own agent."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 90}\n"
        "        - {version: 0.3.0, weight: 10}\n"
    )
    assert findings(spec) == [
        'route "canary" names version "0.3.0" of agent "researcher", which no live instance has'
    ]


def test_a_version_glob_is_never_reported() -> None:
    """A version pattern is open-ended on purpose, even when it matches nothing live."""
    spec = route(
        "      split:\n"
        "        - {version: '1.*', weight: 90}\n"
        "        - {version: '9.*', weight: 10}\n"
    )
    assert findings(spec) == []


def test_a_split_label_no_live_instance_has_is_reported_with_a_suggestion() -> None:
    """A backend's label that no instance of the route's agent announces is reported."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 90}\n"
        "        - {labels: {track: canery}, weight: 10}\n"
    )
    assert findings(spec) == [
        'route "canary" names label "track=canery" of agent "researcher", which no live '
        'instance has (did you mean "track=canary"?)'
    ]


def test_a_label_value_with_wildcard_characters_is_compared_exactly() -> None:
    """Labels match exactly (no globs), so a value like `can*` is looked up as written."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 90}\n"
        "        - {labels: {track: 'can*'}, weight: 10}\n"
    )
    assert findings(spec) == [
        'route "canary" names label "track=can*" of agent "researcher", which no live '
        'instance has (did you mean "track=canary"?)'
    ]


def test_an_unknown_mirror_agent_is_reported_and_its_subset_is_not() -> None:
    """A mirror to an agent nothing live runs is reported once, with a suggestion."""
    spec = route("      mirror: {agent: shadw, version: 9.9.9}\n")
    assert findings(spec) == [
        'route "canary" names agent "shadw", which no live instance has (did you mean "shadow"?)'
    ]


def test_a_mirror_version_is_looked_up_in_the_mirror_agent() -> None:
    """The mirror's version is checked against the instances of the mirror's agent."""
    spec = route("      mirror: {agent: shadow, version: 1.2.0}\n")
    assert findings(spec) == [
        'route "canary" names version "1.2.0" of agent "shadow", which no live instance has'
    ]


def test_a_mirror_label_on_the_route_agent_is_reported() -> None:
    """A shadow deployment of the route's own agent is looked up by its labels."""
    spec = route(
        "      split: [{version: 1.2.0, labels: {track: canary}, weight: 100}]\n"
        "      mirror: {agent: researcher, labels: {track: shadow}}\n"
    )
    assert findings(spec) == [
        'route "canary" names label "track=shadow" of agent "researcher", which no live '
        "instance has"
    ]


def test_a_mirror_agent_without_the_route_endpoints_is_reported() -> None:
    """Copies go to the same endpoint on the mirror: it must announce the route's endpoints."""
    spec = route("      mirror: {agent: planner}\n")
    assert findings(spec) == [
        'route "canary" names endpoint "answer" of agent "planner", which no live instance has'
    ]


def test_an_unknown_route_agent_is_reported_and_its_endpoints_and_versions_are_not() -> None:
    """With the callee unknown, only the agent is reported."""
    spec = """spec:
  routes:
    - name: canary
      match: {agent: reseacher, endpoints: [anything]}
      split:
        - {version: 3.0.0, weight: 100}
"""
    assert findings(spec) == [
        'route "canary" names agent "reseacher", which no live instance has '
        '(did you mean "researcher"?)'
    ]


def test_unknown_route_callers_and_roles_are_reported() -> None:
    """A route's callers are checked like a rule's: agents and role: roles."""
    spec = """spec:
  routes:
    - name: canary
      match: {callers: [planer, "role:coordinater"], agent: researcher}
"""
    assert findings(spec) == [
        'route "canary" names agent "planer", which no live instance has (did you mean "planner"?)',
        'route "canary" names role "coordinater", which no live instance\'s certificate '
        'carries (did you mean "coordinator"?)',
    ]


def test_an_unknown_route_endpoint_is_reported_against_its_agent() -> None:
    """A route endpoint the callee's instances do not announce is reported."""
    spec = """spec:
  routes:
    - name: canary
      match: {agent: researcher, endpoints: [anwser, "drop*"]}
"""
    assert findings(spec) == [
        'route "canary" names endpoint "anwser" of agent "researcher", which no live instance '
        'has (did you mean "answer"?)'
    ]


def test_a_version_named_by_the_split_and_the_mirror_is_reported_once() -> None:
    """The same unknown version of one agent in one route is one finding."""
    spec = route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 100}\n"
        "        - {version: 3.0.0, weight: 0}\n"
        "      mirror: {agent: researcher, version: 3.0.0}\n"
    )
    assert len(findings(spec)) == 1


def test_routes_are_reported_after_rules_and_endpoints_keys() -> None:
    """Findings come in order: rules, endpoints keys, then routes."""
    spec = """spec:
  rules:
    - name: r
      allow: {callers: [ghost-a]}
  endpoints:
    ghost-b.answer: {timeout: 5s}
  routes:
    - name: t
      match: {agent: ghost-c}
"""
    policy = parse_policy(HEADER + spec, source="p.yaml", require_units=True)
    assert [(f.where, f.name) for f in analyze_policy(policy, LIVE)] == [
        ('rule "r"', "ghost-a"),
        ('endpoints key "ghost-b.answer"', "ghost-b"),
        ('route "t"', "ghost-c"),
    ]


def test_an_inventory_without_versions_or_labels_checks_neither() -> None:
    """`Inventory(endpoints, roles)` (no versions or labels given) reports no version or label."""
    old = Inventory({"planner": frozenset(), "researcher": frozenset({"answer"})}, frozenset())
    spec = route(
        "      split:\n"
        "        - {version: 3.0.0, weight: 90}\n"
        "        - {labels: {track: nope}, weight: 10}\n"
    )
    assert findings(spec, old) == []


def test_a_version_finding_carries_typed_fields() -> None:
    """A version finding has its kind, the version and the agent it belongs to."""
    policy = parse_policy(
        HEADER + route("      split:\n        - {version: 3.0.0, weight: 100}\n"),
        source="p.yaml",
    )
    assert analyze_policy(policy, LIVE) == [
        Finding(
            'route "canary"',
            "version",
            "3.0.0",
            agent="researcher",
            suggestions=("2.0.0",),
            loc=("spec", "routes", 0, "split", 0, "version"),
        )
    ]


def test_the_inventory_of_records_has_their_versions_and_labels(trust: Trust) -> None:
    """Inventory.of collects each agent's announced versions and labels."""

    def record(agent: str, version: str, labels: dict[str, str]) -> InstanceRecord:
        cert = trust.identity(agent).certificate
        return InstanceRecord(cert, {"answer": EndpointInfo("answer")}, version, labels, 0.0)

    inv = Inventory.of(
        [
            record("researcher", "1.2.0", {"track": "stable"}),
            record("researcher", "2.0.0", {"track": "canary", "zone": "eu"}),
            record("planner", "0.3.0", {}),
        ]
    )
    assert inv.versions == {"researcher": {"1.2.0", "2.0.0"}, "planner": {"0.3.0"}}
    assert inv.labels == {
        "researcher": {("track", "stable"), ("track", "canary"), ("zone", "eu")},
        "planner": frozenset(),
    }


def test_a_label_finding_suggests_at_most_three_labels_closest_first() -> None:
    """Of four close live labels only the three closest are suggested."""
    inventory = Inventory(
        endpoints={"planner": frozenset({"plan"}), "researcher": frozenset({"answer"})},
        labels={"researcher": frozenset({("track", f"canary{i}") for i in range(1, 5)})},
    )
    spec = route("      split:\n        - {labels: {track: canary1x}, weight: 100}\n")
    found = analyze_policy(parse_policy(HEADER + spec, require_units=True), inventory)

    assert [f.suggestions for f in found] == [("track=canary1", "track=canary4", "track=canary3")]


def test_a_subset_finding_blocks_and_others_do_not() -> None:
    """A version or a label no live instance has blocks an apply; an unknown agent, endpoint
    or role is a warning; a label finding's place is its key under the subset's labels."""
    spec = route(
        "      split: [{version: 1.2.0, labels: {track: nope}, weight: 100}]\n"
        "      mirror: {agent: nobody}\n"
    )
    policy = parse_policy(HEADER + spec, source="p.yaml", require_units=True)
    found = {(f.kind, f.blocking, f.loc) for f in analyze_policy(policy, LIVE)}
    assert found == {
        ("label", True, ("spec", "routes", 0, "split", 0, "labels", "track")),
        ("agent", False, ()),
    }


def test_line_of_finds_a_finding_in_its_file() -> None:
    """The line a finding's place is written on, as policy errors report lines."""
    text = HEADER + route(
        "      split:\n"
        "        - {version: 1.2.0, weight: 50}\n"
        "        - {version: 3.0.0, weight: 50}\n"
    )
    assert line_of(text, ("spec", "routes", 0, "split", 1, "version")) == 10
    assert line_of("{not: [yaml", ("spec",)) is None
