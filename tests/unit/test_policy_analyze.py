"""Unit tests for mesh._core.policy.analyze: names a policy uses that nothing live has."""

from __future__ import annotations

from mesh._core.policy import Finding, Inventory, analyze_policy, parse_policy
from mesh._core.records import EndpointInfo, InstanceRecord
from mesh.testing import Trust

HEADER = "apiVersion: mesh/v1\nkind: Policy\nmetadata: {name: test}\n"

LIVE = Inventory(
    {
        "librarian": frozenset({"search", "fetch"}),
        "planner": frozenset({"plan"}),
        "researcher": frozenset({"answer", "drop-cache"}),
    },
    frozenset({"coordinator", "ops-admin"}),
)


def findings(spec: str, inventory: Inventory = LIVE) -> list[str]:
    policy = parse_policy(HEADER + spec, source="p.yaml", require_units=True)
    return [f.message for f in analyze_policy(policy, inventory)]


def test_a_policy_naming_only_live_things_has_no_findings() -> None:
    """Agents, endpoints and roles that live instances have are not reported."""
    spec = """spec:
  rules:
    - name: ok
      allow: {callers: [planner, "role:coordinator"], agent: researcher, endpoints: [answer]}
  endpoints:
    researcher.answer: {timeout: 5s}
"""
    assert findings(spec) == []


def test_a_misspelt_caller_is_reported_with_a_suggestion() -> None:
    """An unknown caller agent names the rule and suggests the close live name."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [librarain], agent: researcher}
"""
    assert findings(spec) == [
        'rule "x" names agent "librarain", which no live instance has (did you mean "librarian"?)'
    ]


def test_a_misspelt_callee_is_reported_and_its_endpoints_are_not() -> None:
    """An unknown callee agent is reported once; its endpoints are not checked against it."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [planner], agent: reseacher, endpoints: [anything]}
"""
    assert findings(spec) == [
        'rule "x" names agent "reseacher", which no live instance has (did you mean "researcher"?)'
    ]


def test_a_misspelt_endpoint_is_reported_against_its_agent() -> None:
    """An endpoint the callee's instances do not announce is reported with the callee."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [planner], agent: researcher, endpoints: [anwser]}
"""
    assert findings(spec) == [
        'rule "x" names endpoint "anwser" of agent "researcher", which no live instance has '
        '(did you mean "answer"?)'
    ]


def test_an_unknown_role_is_reported_with_a_suggestion() -> None:
    """A role: caller no live certificate carries is reported."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: ["role:coordinater"]}
"""
    assert findings(spec) == [
        'rule "x" names role "coordinater", which no live instance\'s certificate carries '
        '(did you mean "coordinator"?)'
    ]


def test_a_name_far_from_every_live_name_gets_no_suggestion() -> None:
    """Without a close match the message has no "did you mean"."""
    spec = """spec:
  rules:
    - name: x
      deny: {callers: [zzzzzz]}
"""
    assert findings(spec) == ['rule "x" names agent "zzzzzz", which no live instance has']


def test_at_most_three_suggestions_closest_first() -> None:
    """Of five close live names, the three closest are suggested, the closest first."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [plannr]}
"""
    names = ["planner", "planners", "plannerx", "plan-ner", "planer"]
    inventory = Inventory({n: frozenset() for n in names})

    assert findings(spec, inventory) == [
        'rule "x" names agent "plannr", which no live instance has '
        '(did you mean "planner" or "plannerx" or "planners"?)'
    ]


def test_the_star_wildcard_is_never_reported() -> None:
    """`*` matches anything, even an empty directory."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: ["*", "role:*"], agent: "*", endpoints: ["*"]}
"""
    assert findings(spec, Inventory({"a": frozenset({"e"})}, frozenset({"r"}))) == []
    assert findings(spec.replace(', "role:*"', ""), Inventory()) == []


def test_a_pattern_matching_something_live_is_not_reported() -> None:
    """Globs are matched like the engine matches them (fnmatch)."""
    spec = """spec:
  rules:
    - name: x
      deny: {callers: ["plan*", "role:ops-*"], agent: "res?archer", endpoints: ["drop*"]}
"""
    assert findings(spec) == []


def test_a_pattern_matching_nothing_live_is_not_reported() -> None:
    """A glob is open-ended on purpose (a deny on `purge*` guards endpoints to come)."""
    spec = """spec:
  rules:
    - name: x
      deny: {callers: ["role:dev-*", "intrud?r"], agent: researcher, endpoints: ["purge*"]}
"""
    assert findings(spec) == []


def test_endpoints_of_an_agent_glob_are_looked_up_in_every_agent_it_matches() -> None:
    """With a callee glob, an endpoint is known when any matching agent announces it."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [planner], agent: "*", endpoints: [search, answer, nope]}
"""
    assert findings(spec) == [
        'rule "x" names endpoint "nope" of agent "*", which no live instance has'
    ]


def test_endpoints_of_a_partial_agent_glob_are_looked_up_only_in_the_agents_it_matches() -> None:
    """With a callee glob such as lib*, an endpoint only another agent announces is reported."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [planner], agent: "lib*", endpoints: [search, answer]}
"""
    assert findings(spec) == [
        'rule "x" names endpoint "answer" of agent "lib*", which no live instance has'
    ]


def test_endpoint_settings_keys_are_checked() -> None:
    """The keys of spec.endpoints are checked like rules."""
    spec = """spec:
  endpoints:
    librarian.serch: {timeout: 5s}
    planer.plan: {timeout: 5s}
    "*.answer": {timeout: 5s}
"""
    assert findings(spec) == [
        'endpoints key "librarian.serch" names endpoint "serch" of agent "librarian", which '
        'no live instance has (did you mean "search"?)',
        'endpoints key "planer.plan" names agent "planer", which no live instance has '
        '(did you mean "planner"?)',
    ]


def test_a_name_used_twice_in_one_rule_is_reported_once() -> None:
    """The same unknown name as caller and callee of one rule is one finding."""
    spec = """spec:
  rules:
    - name: x
      allow: {callers: [ghost], agent: ghost}
"""
    assert len(findings(spec)) == 1


def test_the_inventory_of_records_has_their_agents_endpoints_and_roles(trust: Trust) -> None:
    """Inventory.of collects agents, announced endpoints and certificate roles."""

    def record(agent: str, roles: list[str], endpoints: list[str]) -> InstanceRecord:
        cert = trust.identity(agent, roles=roles).certificate
        return InstanceRecord(cert, {e: EndpointInfo(e) for e in endpoints}, "1", {}, 0.0)

    inv = Inventory.of(
        [
            record("researcher", ["coordinator"], ["answer"]),
            record("researcher", [], ["drop-cache"]),
            record("planner", ["ops"], []),
        ]
    )
    assert inv.agents == {"researcher", "planner"}
    assert inv.endpoints["researcher"] == {"answer", "drop-cache"}
    assert inv.roles == {"coordinator", "ops"}


def test_a_finding_carries_typed_fields() -> None:
    """Findings expose what they are about, not just a message."""
    policy = parse_policy(
        HEADER + "spec:\n  rules:\n    - name: x\n      allow: {callers: [planer]}\n",
        source="p.yaml",
    )
    assert analyze_policy(policy, LIVE) == [
        Finding('rule "x"', "agent", "planer", suggestions=("planner",))
    ]
