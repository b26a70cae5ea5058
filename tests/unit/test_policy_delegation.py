"""Unit tests for what policy says about delegation chains: the rule fields ``origins``,
``via``, ``max_depth`` and ``scopes``, ``spec.delegation`` (``max_depth``, ``reentrant``), the
rate limit ``per_origin``; how the engine matches chains, the rate limiter's per-origin
buckets, the canonical bytes and the diff (``docs/policy.md``, ``docs/protocol.md`` section 37).
"""

from __future__ import annotations

import json

import pytest

from mesh._core.delegation import DEFAULT_MAX_DEPTH
from mesh._core.policy import (
    Policy,
    PolicyEngine,
    PolicyError,
    RateLimitSpec,
    canonical_policy_bytes,
    diff_policies,
    parse_canonical,
    parse_policy,
    policy_text,
)
from mesh._core.policy.model import DelegationSpec, Match
from mesh._core.ratelimit import RateLimiter
from mesh.testing import FakeClock

HEAD = "apiVersion: mesh/v1\nkind: Policy\nmetadata: {name: t}\nspec:\n"

Chain = tuple[str, tuple[str, ...], int, tuple[str, ...]]


def policy(spec: str) -> Policy:
    return parse_policy(HEAD + spec, "p.yaml", require_units=True)


def problems(spec: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(PolicyError) as info:
        policy(spec)
    return [(e.path, e.problem, e.line) for e in info.value.errors]


def rule(fields: str, effect: str = "allow", name: str = "r") -> str:
    return f"  rules:\n    - name: {name}\n      {effect}: {{callers: ['*'], {fields}}}\n"


def engine(spec: str) -> PolicyEngine:
    return PolicyEngine(policy(spec), revision=3, source="p.yaml")


def chain(origin: str, *path: str, scopes: tuple[str, ...] = ()) -> Chain:
    """The chain a callee saw: ``origin``, the agents it came through, its depth."""
    return (origin, path, len(path), scopes)


# --- the model: new rule fields -------------------------------------------------------------------

AT = "spec.rules[0].allow"
NAME_RULES = "use 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit"


@pytest.mark.parametrize(
    ("fields", "path", "problem"),
    [
        ("origins: []", "origins", "must not be empty"),
        ("origins: [User:alice]", "origins[0]",
         "origin 'User:alice' must be an agent pattern or kind:name (user:alice)"),
        ("origins: ['user:a b']", "origins[0]",
         "origin 'user:a b' must be an agent pattern or kind:name (user:alice)"),
        ("origins: ['user:']", "origins[0]",
         "origin 'user:' must be an agent pattern or kind:name (user:alice)"),
        ("origins: [':alice']", "origins[0]",
         "origin ':alice' must be an agent pattern or kind:name (user:alice)"),
        ("origins: ['averyveryverylongk:alice']", "origins[0]",
         "origin 'averyveryverylongk:alice' must be an agent pattern or kind:name (user:alice)"),
        ("origins: [5]", "origins[0]", "expected a agent name or pattern (a string), got 5"),
        ("origins: [Planner]", "origins[0]", f"invalid agent name 'Planner': {NAME_RULES}"),
        ("via: []", "via", "must not be empty"),
        ("via: ['user:x']", "via[0]", f"invalid agent name 'user:x': {NAME_RULES}"),
        ("via: [7]", "via[0]", "expected a agent name or pattern (a string), got 7"),
        ("max_depth: 0", "max_depth", "Input should be greater than or equal to 1 (got 0)"),
        ("max_depth: '2'", "max_depth", "expected an integer (got '2')"),
        ("max_depth: true", "max_depth", "expected an integer (got True)"),
        ("max_depth: 1.0", "max_depth", "expected an integer (got 1.0)"),
        ("scopes: []", "scopes", "must not be empty"),
        ("scopes: [read, Bad]", "scopes[1]", "scope 'Bad' must match [a-z0-9][a-z0-9_.:-]{0,62}"),
        ("scopes: [-read]", "scopes[0]", "scope '-read' must match [a-z0-9][a-z0-9_.:-]{0,62}"),
        ("scopes: [5]", "scopes[0]", "scope 5 must match [a-z0-9][a-z0-9_.:-]{0,62}"),
    ],
)  # fmt: skip
def test_bad_chain_fields(fields: str, path: str, problem: str) -> None:
    assert problems(rule(fields)) == [(f"{AT}.{path}", problem, 7)]


def test_good_chain_fields() -> None:
    p = policy(
        rule(
            "origins: [planner, 'plan*', 'user:*', 'user:alice', 'svc-1:a.b@c+d_e-f', "
            "'x:?b'], via: [assistant, 'as*'], max_depth: 1, scopes: [read, 'a.b:c-d_e']"
        )
    )
    m = p.spec.rules[0].match
    assert m.origins == ("planner", "plan*", "user:*", "user:alice", "svc-1:a.b@c+d_e-f", "x:?b")
    assert (m.via, m.max_depth, m.scopes) == (("assistant", "as*"), 1, ("read", "a.b:c-d_e"))
    one = policy(rule("origins: [a], via: [b], scopes: [c]")).spec.rules[0].match
    assert (one.origins, one.via, one.scopes) == (("a",), ("b",), ("c",))
    long = "k" * 16 + ":" + "n" * 128
    assert policy(rule(f"origins: ['{long}']")).spec.rules[0].match.origins == (long,)


@pytest.mark.parametrize("name", ["origins", "via", "max_depth", "scopes"])
def test_on_chain_is_any_chain_field(name: str) -> None:
    value = {"origins": ["a"], "via": ["a"], "max_depth": 2, "scopes": ["a"]}[name]
    assert Match.model_validate({"callers": ["*"], name: value}).on_chain is True
    assert Match.model_validate({"callers": ["*"]}).on_chain is False


def test_unset_chain_fields_are_left_out_of_the_serialization() -> None:
    m = Match.model_validate({"callers": ["x"]})
    assert m.model_dump() == {"callers": ("x",), "agent": "*", "endpoints": ("*",)}
    m = Match.model_validate({"callers": ["x"], "max_depth": 2})
    assert m.model_dump() == {"callers": ("x",), "agent": "*", "endpoints": ("*",), "max_depth": 2}
    m = Match.model_validate({"callers": ["x"], "origins": ["a"], "via": ["b"], "scopes": ["c"]})
    assert m.model_dump(mode="json") == {
        "callers": ["x"], "agent": "*", "endpoints": ["*"], "origins": ["a"], "via": ["b"],
        "scopes": ["c"],
    }  # fmt: skip


# --- the model: spec.delegation and per_origin ----------------------------------------------------


@pytest.mark.parametrize(
    ("block", "path", "problem"),
    [
        ("{max_depth: 0}", "max_depth", "Input should be greater than or equal to 1 (got 0)"),
        ("{max_depth: 33}", "max_depth", "Input should be less than or equal to 32 (got 33)"),
        ("{max_depth: 4.0}", "max_depth", "expected an integer (got 4.0)"),
        ("{reentrant: [Bad]}", "reentrant[0]", f"invalid agent name 'Bad': {NAME_RULES}"),
        ("{zzz: 1}", "zzz", "unknown field 'zzz' (expected one of max_depth, reentrant)"),
    ],
)
def test_bad_delegation_limits(block: str, path: str, problem: str) -> None:
    assert problems(f"  delegation: {block}\n") == [(f"spec.delegation.{path}", problem, 5)]


def test_delegation_limits() -> None:
    assert DelegationSpec() == DelegationSpec(max_depth=8, reentrant=())
    assert policy("  delegation: {}\n").spec.delegation == DelegationSpec()
    assert policy("  rules: []\n").spec.delegation is None
    for depth in (1, 32):
        assert policy(f"  delegation: {{max_depth: {depth}}}\n").spec.delegation == (
            DelegationSpec(max_depth=depth)
        )
    d = policy("  delegation: {reentrant: [planner, 'a*']}\n").spec.delegation
    assert d is not None and d.reentrant == ("planner", "a*")


def test_per_origin_rate_limits() -> None:
    assert problems("  endpoints:\n    a.b:\n      rate_limit: {}\n") == [
        ('spec.endpoints["a.b"].rate_limit',
         "a rate limit needs per_caller, total, per_origin or several", 7),
    ]  # fmt: skip
    assert problems("  endpoints:\n    a.b:\n      rate_limit: {per_origin: 0/s}\n") == [
        ('spec.endpoints["a.b"].rate_limit.per_origin',
         "invalid rate '0/s': must be greater than 0", 7),
    ]  # fmt: skip
    only = RateLimitSpec(per_origin=5.0)
    assert (only.per_caller, only.total, only.per_origin) == (None, None, 5.0)
    assert (only.caller_burst, only.total_capacity) == (0, 0)
    for rate, burst in ((5.0, 5), (2.5, 3), (0.5, 1), (1.0, 1), (30 / 60, 1)):
        assert RateLimitSpec(per_origin=rate).origin_burst == burst
    assert RateLimitSpec(per_caller=5.0).origin_burst == 0
    assert RateLimitSpec(per_caller=1.0, total=2.0, per_origin=3.0).origin_burst == 3


def test_unset_per_origin_and_delegation_are_left_out() -> None:
    assert RateLimitSpec(per_caller=5.0).model_dump() == {
        "per_caller": 5.0, "total": None, "burst": None, "total_burst": None,
    }  # fmt: skip
    assert RateLimitSpec(per_origin=5.0).model_dump()["per_origin"] == 5.0
    spec = policy("  rules: []\n").spec
    assert "delegation" not in spec.model_dump() and "routes" not in spec.model_dump()
    spec = policy("  delegation: {max_depth: 3}\n").spec
    assert spec.model_dump()["delegation"] == {"max_depth": 3, "reentrant": ()}


# --- canonical bytes ------------------------------------------------------------------------------


def test_a_policy_without_chain_fields_keeps_its_canonical_bytes() -> None:
    """A rule, a rate limit, no chain field, no per_origin, no spec.delegation: the bytes
    signed before they existed."""
    p = policy(rule("agent: vault") + "  endpoints:\n    vault.read:\n"
               "      rate_limit: {per_caller: 5/s, total: 10/s}\n")  # fmt: skip
    assert canonical_policy_bytes(p) == (
        b'{"apiVersion":"mesh/v1","kind":"Policy","metadata":{"description":"","name":"t"},'
        b'"spec":{"defaults":{"access_log":false,"authorization":"deny","mode":"enforce",'
        b'"timeout":null},"endpoints":{"vault.read":{"access_log":null,"rate_limit":'
        b'{"burst":null,"per_caller":5.0,"total":10.0,"total_burst":null},"retries":null,'
        b'"timeout":null}},"rules":[{"allow":{"agent":"vault","callers":["*"],"endpoints":["*"]},'
        b'"deny":null,"name":"r"}]}}'
    )


def test_chain_fields_survive_the_canonical_form_and_the_written_text() -> None:
    p = policy(
        rule("agent: vault, origins: ['user:*', planner], via: [assistant], max_depth: 3, "
             "scopes: [read]", effect="deny")
        + "  endpoints:\n    vault.read:\n      rate_limit: {per_origin: 2/s}\n"
        + "  delegation: {max_depth: 4, reentrant: [planner]}\n"
    )  # fmt: skip
    raw = canonical_policy_bytes(p)
    data = json.loads(raw)
    assert data["spec"]["delegation"] == {"max_depth": 4, "reentrant": ["planner"]}
    assert data["spec"]["rules"][0]["deny"] == {
        "agent": "vault", "callers": ["*"], "endpoints": ["*"], "max_depth": 3,
        "origins": ["user:*", "planner"], "scopes": ["read"], "via": ["assistant"],
    }  # fmt: skip
    assert data["spec"]["endpoints"]["vault.read"]["rate_limit"]["per_origin"] == 2.0
    assert parse_canonical(raw) == p
    assert parse_policy(policy_text(p), require_units=True) == p


# --- the engine: chain conditions -----------------------------------------------------------------


def allowed(e: PolicyEngine, c: Chain | None, caller: str = "assistant",
            agent: str = "vault", endpoint: str = "read") -> bool:  # fmt: skip
    return e.decide(caller, (), agent, endpoint, c).allowed


@pytest.mark.parametrize(
    ("origins", "origin", "expected"),
    [
        ("[planner]", "planner", True),
        ("[planner]", "intern", False),
        ("['plan*']", "planner", True),
        ("['plan*']", "intern", False),
        ("['user:*']", "user:alice", True),
        ("['user:*']", "svc:alice", False),
        ("['user:*']", "planner", False),
        ("['user:alice']", "user:alice", True),
        ("['user:alice']", "user:bob", False),
        ("['user:a?ice']", "user:alice", True),
        ("['*']", "user:alice", True),
        ("[intern, 'user:*']", "user:bob", True),
        ("[intern, 'user:*']", "intern", True),
        ("[intern, 'user:*']", "boss", False),
    ],
)
def test_origins(origins: str, origin: str, expected: bool) -> None:
    e = engine(rule(f"agent: vault, origins: {origins}"))
    assert allowed(e, (origin, ("gateway", "assistant"), 2, ())) is expected


def test_via_needs_every_agent_in_the_path() -> None:
    e = engine(rule("agent: vault, via: [planner, 'ass*']"))
    assert allowed(e, chain("planner", "planner", "assistant"))
    assert allowed(e, chain("boss", "boss", "planner", "assistant"))
    assert not allowed(e, chain("planner", "planner", "librarian"))
    assert not allowed(e, chain("boss", "boss", "assistant"))
    one = engine(rule("agent: vault, via: [planner]"))
    assert allowed(one, chain("intern", "intern", "planner", "assistant"))
    assert not allowed(one, chain("intern", "intern", "assistant"))


@pytest.mark.parametrize(("depth", "expected"), [(1, True), (2, True), (3, False), (9, False)])
def test_max_depth_is_at_most(depth: int, expected: bool) -> None:
    e = engine(rule("agent: vault, max_depth: 2"))
    assert allowed(e, ("planner", ("planner",) * depth, depth, ())) is expected


def test_scopes_are_all_required() -> None:
    e = engine(rule("agent: vault, scopes: [read, write]"))
    assert allowed(e, chain("planner", "planner", scopes=("write", "read", "admin")))
    assert not allowed(e, chain("planner", "planner", scopes=("read",)))
    assert not allowed(e, chain("planner", "planner"))
    one = engine(rule("agent: vault, scopes: [read]"))
    assert allowed(one, chain("planner", "planner", scopes=("read",)))


def test_every_chain_condition_must_hold() -> None:
    e = engine(rule("agent: vault, origins: ['user:*'], via: [assistant], max_depth: 3, "
                    "scopes: [read]"))  # fmt: skip
    good = ("user:alice", ("gateway", "assistant"), 2, ("read",))
    assert allowed(e, good)
    assert not allowed(e, ("svc:alice", good[1], good[2], good[3]))
    assert not allowed(e, (good[0], ("gateway", "planner"), 2, ("read",)))
    assert not allowed(e, (good[0], good[1], 4, ("read",)))
    assert not allowed(e, (good[0], good[1], 2, ()))


def test_chain_rules_still_need_the_caller_agent_and_endpoint() -> None:
    e = engine("  rules:\n    - name: r\n      allow: {callers: [assistant], agent: vault, "
               "endpoints: [read], origins: [planner]}\n")  # fmt: skip
    c = chain("planner", "planner", "assistant")
    assert allowed(e, c)
    assert not allowed(e, c, caller="librarian")
    assert not allowed(e, c, agent="librarian")
    assert not allowed(e, c, endpoint="write")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("origins: [assistant]", True),  # the caller is the origin
        ("origins: [planner]", False),
        ("origins: ['user:*']", False),
        ("via: [assistant]", True),  # the path is the caller
        ("via: [planner]", False),
        ("max_depth: 1", True),  # depth 1
        ("scopes: [read]", False),  # no scopes
    ],
)
def test_a_direct_call_is_the_callers_own_at_depth_one(fields: str, expected: bool) -> None:
    e = engine(rule(f"agent: vault, {fields}"))
    assert allowed(e, None) is expected
    assert allowed(e, ("assistant", ("assistant",), 1, ())) is expected  # the same, spelled out


def test_deny_rules_come_before_allow_rules() -> None:
    e = engine(
        "  defaults: {authorization: allow}\n"
        "  rules:\n"
        "    - name: assistant-reads\n      allow: {callers: [assistant], agent: vault}\n"
        "    - name: not-for-interns\n      deny: {callers: ['*'], agent: vault, "
        "origins: [intern]}\n"
    )
    intern = chain("intern", "intern", "assistant")
    boss = chain("boss", "boss", "assistant")
    assert e.decide("assistant", (), "vault", "read", intern).rule == "not-for-interns"
    assert not e.decide("assistant", (), "vault", "read", intern).allowed
    assert e.decide("assistant", (), "vault", "read", boss).rule == "assistant-reads"
    assert e.decide("assistant", (), "vault", "read", None).rule == "assistant-reads"
    assert e.explain("assistant", (), "vault", "read", intern) == (
        'DENY by rule "not-for-interns" (p.yaml, revision 3)'
    )
    assert e.explain("assistant", (), "vault", "read", boss) == (
        'ALLOW by rule "assistant-reads" (p.yaml, revision 3)'
    )
    r = e.route("assistant", (), "vault", "read", intern)
    assert (r.decision.rule, r.decision.allowed) == ("not-for-interns", False)
    assert e.route("assistant", (), "vault", "read", boss).decision.rule == "assistant-reads"
    assert e.route("assistant", (), "vault", "read").decision.rule == "assistant-reads"


def test_an_allow_by_chain_falls_back_to_the_default() -> None:
    e = engine(rule("agent: vault, origins: [boss]"))
    assert (
        e.decide("assistant", (), "vault", "read", chain("boss", "boss", "assistant")).rule == "r"
    )
    d = e.decide("assistant", (), "vault", "read", chain("intern", "intern", "assistant"))
    assert (d.rule, d.allowed) == ("default deny", False)


def test_decisions_are_cached_with_the_chain_only_when_a_rule_looks_at_it() -> None:
    plain = engine(rule("agent: vault"))
    assert plain.on_chain is False
    for c in (chain("a", "a", "b"), chain("c", "c", "b"), None):
        assert plain.decide("b", (), "vault", "read", c).rule == "r"
        plain.route("b", (), "vault", "read", c)
    assert len(plain._decisions) == 1 and len(plain._routes) == 1
    chained = engine(rule("agent: vault, origins: [a]"))
    assert chained.on_chain is True
    assert chained.decide("b", (), "vault", "read", chain("a", "a", "b")).allowed
    assert not chained.decide("b", (), "vault", "read", chain("c", "c", "b")).allowed
    assert chained.decide("a", (), "vault", "read", None).allowed
    assert chained.decide("a", (), "vault", "read", chain("a", "a")).allowed  # another key
    assert len(chained._decisions) == 4
    assert chained.route("b", (), "vault", "read", chain("a", "a", "b")).decision.allowed
    assert not chained.route("b", (), "vault", "read", chain("c", "c", "b")).decision.allowed
    assert not chained.route("b", (), "vault", "read").decision.allowed
    assert len(chained._routes) == 3


def test_on_chain_looks_at_rules_only() -> None:
    assert PolicyEngine(None).on_chain is False
    assert engine("  rules: []\n").on_chain is False
    assert engine(rule("max_depth: 4", effect="deny")).on_chain is True
    routed = engine(
        "  routes:\n    - name: t\n      match: {agent: vault}\n" + rule("agent: vault")
    )
    assert routed.on_chain is False


def test_routes_ignore_the_chain() -> None:
    e = engine(rule("agent: vault, origins: [a]") + "  routes:\n    - name: t\n"
               "      match: {callers: [b], agent: vault}\n")  # fmt: skip
    for c in (chain("a", "a", "b"), chain("c", "c", "b"), None):
        assert [t.name for t in e.route("b", (), "vault", "read", c).traffic] == ["t"]


def test_max_depth_and_reentrant() -> None:
    none = PolicyEngine(None)
    assert none.max_depth == DEFAULT_MAX_DEPTH == 8 and not none.reentrant("planner")
    plain = engine("  rules: []\n")
    assert plain.max_depth == 8 and not plain.reentrant("planner") and not plain.reentrant("*")
    e = engine("  delegation: {max_depth: 3, reentrant: [planner, 'lib*']}\n")
    assert e.max_depth == 3
    assert e.reentrant("planner") and e.reentrant("librarian")
    assert not e.reentrant("vault") and not e.reentrant("planner2")
    assert engine("  delegation: {}\n").max_depth == 8
    assert engine("  delegation: {reentrant: ['*']}\n").reentrant("anyone")


# --- the rate limiter: per-origin buckets ---------------------------------------------------------


def test_two_origins_of_one_caller_have_their_own_buckets() -> None:
    limiter = RateLimiter(clock=FakeClock())
    limit = RateLimitSpec(per_origin=1.0)
    assert limiter.take("assistant", "vault", "read", limit, "user:alice") is None
    assert limiter.take("assistant", "vault", "read", limit, "user:alice") == pytest.approx(1.0)
    assert limiter.take("assistant", "vault", "read", limit, "user:bob") is None
    assert limiter.take("assistant", "vault", "read", limit, "user:bob") == pytest.approx(1.0)
    assert len(limiter) == 2


def test_one_origin_through_two_callers_shares_one_bucket() -> None:
    limiter = RateLimiter(clock=FakeClock())
    limit = RateLimitSpec(per_origin=2.0)
    assert limiter.take("assistant", "vault", "read", limit, "intern") is None
    assert limiter.take("planner", "vault", "read", limit, "intern") is None
    assert limiter.take("librarian", "vault", "read", limit, "intern") == pytest.approx(0.5)
    assert limiter.take("librarian", "vault", "read", limit, "boss") is None
    assert limiter.take("librarian", "vault", "write", limit, "intern") is None  # per endpoint
    assert limiter.take("librarian", "scribe", "read", limit, "intern") is None  # per agent


def test_the_per_origin_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limit = RateLimitSpec(per_origin=2.5)  # a bucket of 3
    assert [limiter.take("a", "v", "r", limit, "o") for _ in range(3)] == [None] * 3
    assert limiter.take("a", "v", "r", limit, "o") == pytest.approx(0.4)
    clock.advance(0.3)
    assert limiter.take("a", "v", "r", limit, "o") == pytest.approx(0.1)
    clock.advance(0.2)
    assert limiter.take("a", "v", "r", limit, "o") is None


def test_without_an_origin_there_is_no_origin_bucket() -> None:
    limiter = RateLimiter(clock=FakeClock())
    limit = RateLimitSpec(per_origin=1.0)
    assert [limiter.take("a", "v", "r", limit) for _ in range(5)] == [None] * 5
    assert len(limiter) == 0


def test_per_origin_adds_to_the_per_caller_and_total_buckets() -> None:
    limiter = RateLimiter(clock=FakeClock())
    limit = RateLimitSpec(per_caller=10.0, total=10.0, per_origin=1.0)
    assert limiter.take("a", "v", "r", limit, "o") is None
    assert len(limiter) == 3
    assert limiter.take("a", "v", "r", limit, "o") == pytest.approx(1.0)  # the origin's
    assert limiter.take("a", "v", "r", limit, "p") is None  # nothing was taken by the refusal
    narrow = RateLimitSpec(per_caller=1.0, per_origin=10.0)
    assert limiter.take("b", "v", "r", narrow, "q") is None
    assert limiter.take("b", "v", "r", narrow, "q") == pytest.approx(1.0)  # the caller's


def test_check_never_looks_at_the_origin() -> None:
    limiter = RateLimiter(clock=FakeClock())
    limit = RateLimitSpec(per_origin=1.0)
    assert limiter.take("a", "v", "r", limit, "o") is None
    assert limiter.take("a", "v", "r", limit, "o") is not None  # the origin's bucket is empty
    assert limiter.check("a", "v", "r", limit) is None
    both = RateLimitSpec(per_caller=1.0, per_origin=1.0)
    assert limiter.take("b", "v", "r", both, "o2") is None
    assert limiter.check("b", "v", "r", both) == pytest.approx(1.0)  # the caller's only


def test_a_changed_per_origin_rate_makes_a_fresh_bucket() -> None:
    limiter = RateLimiter(clock=FakeClock())
    assert limiter.take("a", "v", "r", RateLimitSpec(per_origin=1.0), "o") is None
    assert limiter.take("a", "v", "r", RateLimitSpec(per_origin=1.0), "o") is not None
    assert limiter.take("a", "v", "r", RateLimitSpec(per_origin=2.0), "o") is None


def test_a_caller_joining_a_total_gets_only_what_the_others_shares_spill() -> None:
    """Not about origins: the total's fair shares (``SharedBucket``). When a second caller
    joins, the first caller's share above the new cap (burst / 2) spills into the pool, and
    only that: the newcomer gets one token from the pool, then waits for its own share."""
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limit = RateLimitSpec(total=4.0, total_burst=4)
    assert limiter.take("a", "v", "r", limit) is None  # from the pool: 3 left there
    clock.advance(1.0)  # a's share fills to 4 (the pool gives way: 4 held in all)
    assert limiter.take("a", "v", "r", limit) is None  # a holds 3
    assert limiter.take("b", "v", "r", limit) is None  # b joins: a keeps 2, 1 spills
    assert limiter.take("b", "v", "r", limit) == pytest.approx(0.5)  # b's own share, at 2/s


# --- the diff -------------------------------------------------------------------------------------


def test_diff_shows_the_chain_fields_of_rules() -> None:
    """Regression: a rule's origins, via, scopes and max_depth are in its summary."""
    old = policy(rule("agent: vault, origins: [intern, 'user:*'], via: [assistant], "
                      "scopes: [read, write], max_depth: 3", effect="deny"))  # fmt: skip
    lines = diff_policies(None, old)
    assert lines == [
        'policy "t" (no policy installed before)',
        "defaults: authorization=deny mode=enforce timeout=none access_log=false",
        'rule "r" added: deny callers=[*] agent=vault endpoints=[*] origins=[intern, user:*] '
        "via=[assistant] scopes=[read, write] max_depth=3",
    ]
    new = policy(rule("agent: vault, origins: [intern]", effect="deny"))
    assert diff_policies(old, new) == [
        'rule "r" changed: deny callers=[*] agent=vault endpoints=[*] origins=[intern, user:*] '
        "via=[assistant] scopes=[read, write] max_depth=3 -> "
        "deny callers=[*] agent=vault endpoints=[*] origins=[intern]"
    ]
    plain = policy(rule("agent: vault", effect="deny"))
    assert diff_policies(plain, new) == [
        'rule "r" changed: deny callers=[*] agent=vault endpoints=[*] -> '
        "deny callers=[*] agent=vault endpoints=[*] origins=[intern]"
    ]
    assert diff_policies(plain, policy(rule("agent: vault, max_depth: 1", effect="deny"))) == [
        'rule "r" changed: deny callers=[*] agent=vault endpoints=[*] -> '
        "deny callers=[*] agent=vault endpoints=[*] max_depth=1"
    ]


def test_diff_shows_the_delegation_limits() -> None:
    """Regression: ``spec.delegation`` changes are listed, against its defaults when unset."""
    plain = policy("  rules: []\n")
    limited = policy("  delegation: {max_depth: 3, reentrant: [planner, 'lib*']}\n")
    assert diff_policies(plain, limited) == [
        "delegation.max_depth 8 -> 3",
        "delegation.reentrant [] -> [planner, lib*]",
    ]
    assert diff_policies(limited, plain) == [
        "delegation.max_depth 3 -> 8",
        "delegation.reentrant [planner, lib*] -> []",
    ]
    deeper = policy("  delegation: {max_depth: 4, reentrant: [planner, 'lib*']}\n")
    assert diff_policies(limited, deeper) == ["delegation.max_depth 3 -> 4"]
    assert diff_policies(plain, policy("  delegation: {}\n")) == []
    assert diff_policies(limited, limited) == []
    assert diff_policies(None, limited) == [
        'policy "t" (no policy installed before)',
        "defaults: authorization=deny mode=enforce timeout=none access_log=false",
        "delegation: max_depth=3 reentrant=[planner, lib*]",
    ]
    assert diff_policies(None, plain) == [
        'policy "t" (no policy installed before)',
        "defaults: authorization=deny mode=enforce timeout=none access_log=false",
    ]


def test_diff_shows_per_origin() -> None:
    def limited(limit: str) -> Policy:
        return policy(f"  endpoints:\n    vault.read:\n      rate_limit: {limit}\n")

    assert diff_policies(limited("{per_caller: 5/s}"), limited("{per_caller: 5/s, "
                                                               "per_origin: 2/s}")) == [
        "endpoint vault.read changed: rate_limit.per_origin none -> 2/s"
    ]  # fmt: skip
    assert diff_policies(None, limited("{per_origin: 1/m}"))[-1] == (
        "endpoint vault.read added: rate_limit.per_origin=0.016666666666666666/s"
    )
