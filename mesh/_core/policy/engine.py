"""Authorization decisions and endpoint settings: ``PolicyEngine`` compiles a policy's rules and
endpoint keys, and answers per call with a ``Decision`` (naming the rule), the winning
``EndpointPolicy``, or both at once as a ``Route``. Pure; answers are cached per input.

Evaluation order: deny rules (first match in file order), then allow rules (first match), then
``spec.defaults.authorization``. With no policy installed at all the engine allows everything
(rule ``"no policy"``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mesh._core.delegation import DEFAULT_MAX_DEPTH
from mesh._core.policy.model import (
    CircuitBreakerSpec,
    EndpointPolicy,
    LoadBalancer,
    Match,
    OutlierDetectionSpec,
    Policy,
    RateLimitSpec,
    RetrySpec,
    TrafficRoute,
    _is_glob,
)

_CACHE_MAX = 10_000

# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------

_DEFAULT_RULES = frozenset({"default deny", "default allow", "no policy"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization check.

    Attributes:
        allowed: whether the call may proceed (False only for a deny in enforce mode).
        rule: the deciding rule's name, or ``"default deny"``, ``"default allow"`` or
            ``"no policy"``.
        effect: what the policy says: ``"allow"`` or ``"deny"``.
        audit_only: a denial that audit mode let through (log and count it).
    """

    allowed: bool
    rule: str
    effect: Literal["allow", "deny"]
    audit_only: bool

    def explain(self, source: str | None = None, revision: int | None = None) -> str:
        """One line for people, e.g. ``ALLOW by rule "planner-may-ask" (policies/x.yaml,
        revision 7)`` or ``ALLOW (audit mode; would DENY by default deny; revision 3)``."""
        context = ", ".join(
            p for p in (source, None if revision is None else f"revision {revision}") if p
        )
        if self.rule == "no policy":
            return "ALLOW (no policy installed" + (f"; {context})" if context else ")")
        by = self.rule if self.rule in _DEFAULT_RULES else f'rule "{self.rule}"'
        if self.audit_only:
            return f"ALLOW (audit mode; would DENY by {by}" + (f"; {context})" if context else ")")
        verb = "ALLOW" if self.allowed else "DENY"
        return f"{verb} by {by}" + (f" ({context})" if context else "")


@dataclass(frozen=True, slots=True)
class Route:
    """What policy says about one call: resolved once per (caller, roles, agent, endpoint).

    Attributes:
        decision: the authorization decision (``PolicyEngine.decide``).
        settings: the winning ``spec.endpoints`` entry (``PolicyEngine.endpoint_settings``),
            or ``None``.
        timeout: the request timeout policy sets: the entry's ``timeout``, else
            ``defaults.timeout`` (``PolicyEngine.timeout_for``); ``None``: the caller's own
            default applies.
        retries: the entry's ``retries``, if any.
        rate_limit: the entry's ``rate_limit``, if any.
        max_queue: the entry's ``max_queue``: how many requests may wait for a concurrency
            slot; ``None``: the runtime's default.
        access_log: whether to write an access-log line: the entry's ``access_log``, else
            ``defaults.access_log``; ``False`` with no policy.
        destination: the winning ``spec.endpoints`` key (``researcher.*``): the scope of the
            entry's circuit breaker and outlier detection, shared by the calls it matches.
        traffic: the ``spec.routes`` whose callers, agent and endpoints match, in file order;
            ``select`` picks the first whose metadata matches a call's.
    """

    decision: Decision
    settings: EndpointPolicy | None
    timeout: float | None
    retries: RetrySpec | None
    rate_limit: RateLimitSpec | None
    access_log: bool
    max_queue: int | None = None
    destination: str | None = None
    traffic: tuple[TrafficRoute, ...] = ()

    @property
    def circuit_breaker(self) -> CircuitBreakerSpec | None:
        return None if self.settings is None else self.settings.circuit_breaker

    @property
    def outlier_detection(self) -> OutlierDetectionSpec | None:
        return None if self.settings is None else self.settings.outlier_detection

    @property
    def load_balancer(self) -> LoadBalancer:
        lb = None if self.settings is None else self.settings.load_balancer
        return lb or "least_outstanding"

    def select(self, metadata: dict[str, str] | None) -> TrafficRoute | None:
        """The first of ``traffic`` whose metadata all match the call's, or ``None``."""
        for tr in self.traffic:
            want = tr.match.metadata
            if not want or (
                metadata is not None and all(metadata.get(k) == v for k, v in want.items())
            ):
                return tr
        return None


class _Names:
    """A compiled set of name patterns: exact names by set lookup, globs by one regex."""

    __slots__ = ("any", "exact", "regex")

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = list(patterns)
        self.any = "*" in pats
        self.exact = frozenset(p for p in pats if not _is_glob(p))
        globs = [p for p in pats if _is_glob(p)]
        self.regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globs)) if globs else None
        )

    def matches(self, name: str) -> bool:
        return (
            self.any
            or name in self.exact
            or (self.regex is not None and self.regex.match(name) is not None)
        )

    @property
    def empty(self) -> bool:
        return not self.any and not self.exact and self.regex is None


Chain = tuple[str, tuple[str, ...], int, tuple[str, ...]]
"""What rules see of a delegation chain: origin, path (origin's agent first, the caller last),
depth, scopes. A direct call is ``(caller, (caller,), 1, ())``."""


class _CompiledRule:
    """The callers, callee agent and endpoints of a rule or a route, compiled, and the
    conditions a rule puts on the delegation chain."""

    __slots__ = ("agent", "endpoints", "max_depth", "name", "names", "origins", "roles", "scopes",
                 "via")  # fmt: skip

    def __init__(
        self,
        name: str,
        callers: Iterable[str],
        agent: str,
        endpoints: Iterable[str],
        match: Match | None = None,
    ) -> None:
        callers = tuple(callers)
        self.name = name
        self.names = _Names(c for c in callers if not c.startswith("role:"))
        self.roles = _Names(c[5:] for c in callers if c.startswith("role:"))
        self.agent = _Names([agent])
        self.endpoints = _Names(endpoints)
        self.origins: _Names | None = None
        self.via: tuple[_Names, ...] = ()
        self.max_depth: int | None = None
        self.scopes: frozenset[str] = frozenset()
        if match is not None and match.on_chain:
            self.origins = _Names(match.origins) if match.origins else None
            self.via = tuple(_Names([v]) for v in match.via or ())
            self.max_depth = match.max_depth
            self.scopes = frozenset(match.scopes or ())

    def matches(
        self,
        caller: str,
        roles: tuple[str, ...],
        callee: str,
        endpoint: str,
        chain: Chain | None = None,
    ) -> bool:
        if not (self.agent.matches(callee) and self.endpoints.matches(endpoint)):
            return False
        if not self.names.matches(caller) and not (
            not self.roles.empty and any(self.roles.matches(r) for r in roles)
        ):
            return False
        if self.origins is None and not self.via and self.max_depth is None and not self.scopes:
            return True
        origin, path, depth, scopes = chain or (caller, (caller,), 1, ())
        return (
            (self.origins is None or self.origins.matches(origin))
            and all(any(v.matches(a) for a in path) for v in self.via)
            and (self.max_depth is None or depth <= self.max_depth)
            and self.scopes.issubset(scopes)
        )


def _specificity(key: str, index: int) -> tuple[bool, bool, int, int]:
    agent, endpoint = key.split(".")
    literal = sum(1 for c in key if c not in "*?[]!")
    return (not _is_glob(agent), not _is_glob(endpoint), literal, -index)


def _features(policy: Policy) -> frozenset[str]:
    spec = policy.spec
    found = set()
    for t in spec.routes:
        found.add("routes")
        if t.fault is not None:
            found.add("fault")
        if t.mirror is not None:
            found.add("mirror")
    for ep in spec.endpoints.values():
        if ep.circuit_breaker is not None:
            found.add("circuit_breaker")
        if ep.outlier_detection is not None:
            found.add("outlier_detection")
        if ep.load_balancer == "peak_ewma":
            found.add("peak_ewma")
    return frozenset(found)


class PolicyEngine:
    """Answers "may this caller call that endpoint?" and "what are this endpoint's settings?".

    Args:
        policy: the installed policy; ``None`` means none is installed yet, and everything is
            allowed (rule ``"no policy"``): the mesh runs open until a policy is applied, like
            Istio without an AuthorizationPolicy.
        revision: the registry's revision number of the policy, for explanations.
        source: where the policy came from (a file name), for explanations.

    Decisions, endpoint settings and routes are cached per input (bounded; the cache is emptied
    when full), so a repeated call costs about one dict lookup.
    """

    def __init__(
        self, policy: Policy | None, *, revision: int | None = None, source: str | None = None
    ) -> None:
        self._policy = policy
        self._revision = revision
        self._source = source
        self._decisions: dict[tuple[object, ...], Decision] = {}
        self._settings: dict[tuple[str, str], tuple[str | None, EndpointPolicy | None]] = {}
        self._routes: dict[tuple[object, ...], Route] = {}
        if policy is None:
            self.on_chain = False
            self.max_depth = DEFAULT_MAX_DEPTH
            self._reentrant = _Names(())
            self._deny: list[_CompiledRule] = []
            self._allow: list[_CompiledRule] = []
            self._endpoints: list[tuple[_Names, _Names, str, EndpointPolicy]] = []
            self._traffic: list[tuple[_CompiledRule, TrafficRoute]] = []
            self._default = Decision(True, "no policy", "allow", False)
            self._audit = False
            self.features: frozenset[str] = frozenset()
            return
        spec = policy.spec
        self._audit = spec.defaults.mode == "audit"
        rules = [(r, r.match) for r in spec.rules]
        self._deny = [
            _CompiledRule(r.name, m.callers, m.agent, m.endpoints, m)
            for r, m in rules
            if r.deny is not None
        ]
        self._allow = [
            _CompiledRule(r.name, m.callers, m.agent, m.endpoints, m)
            for r, m in rules
            if r.allow is not None
        ]
        self.on_chain = any(m.on_chain for _r, m in rules)
        """Whether some rule looks at delegation chains (then decisions depend on them)."""
        delegation = spec.delegation
        self.max_depth = DEFAULT_MAX_DEPTH if delegation is None else delegation.max_depth
        self._reentrant = _Names(() if delegation is None else delegation.reentrant)
        self._traffic = [
            (_CompiledRule(t.name, t.match.callers, t.match.agent, t.match.endpoints), t)
            for t in spec.routes
        ]
        self.features = _features(policy)
        """What the client pipeline needs stages for: ``routes``, ``fault``, ``mirror``,
        ``circuit_breaker``, ``outlier_detection``, ``peak_ewma``."""
        self._default = self._verdict(
            f"default {spec.defaults.authorization}", spec.defaults.authorization
        )
        ranked = sorted(
            enumerate(spec.endpoints.items()),
            key=lambda item: _specificity(item[1][0], item[0]),
            reverse=True,
        )
        self._endpoints = []
        for _i, (key, ep) in ranked:
            agent, endpoint = key.split(".")
            self._endpoints.append((_Names([agent]), _Names([endpoint]), key, ep))

    def _verdict(self, rule: str, effect: Literal["allow", "deny"]) -> Decision:
        if effect == "allow":
            return Decision(True, rule, "allow", False)
        return Decision(self._audit, rule, "deny", self._audit)

    @property
    def policy(self) -> Policy | None:
        """The installed policy (``None``: none yet)."""
        return self._policy

    @property
    def revision(self) -> int | None:
        return self._revision

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def mode(self) -> Literal["enforce", "audit"]:
        """``"audit"`` when denials are only reported; ``"enforce"`` otherwise (also with no
        policy)."""
        return "audit" if self._audit else "enforce"

    def decide(
        self,
        caller_agent: str,
        caller_roles: tuple[str, ...],
        callee_agent: str,
        endpoint: str,
        chain: Chain | None = None,
    ) -> Decision:
        """Decide one call: deny rules first (first match in file order), then allow rules,
        then the default.

        Args:
            caller_agent: the verified caller's agent name.
            caller_roles: the roles in the caller's certificate.
            callee_agent: the agent called.
            endpoint: the endpoint called.
            chain: the call's delegation chain (origin, path, depth, scopes), for rules that
                look at it; ``None``: a direct call.
        """
        if chain is not None and self.on_chain:
            key: tuple[object, ...] = (caller_agent, caller_roles, callee_agent, endpoint, chain)
        else:
            key = (caller_agent, caller_roles, callee_agent, endpoint)
            chain = None
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        decision = self._evaluate(caller_agent, caller_roles, callee_agent, endpoint, chain)
        if len(self._decisions) >= _CACHE_MAX:
            self._decisions.clear()
        self._decisions[key] = decision
        return decision

    def _evaluate(
        self,
        caller: str,
        roles: tuple[str, ...],
        callee: str,
        endpoint: str,
        chain: Chain | None = None,
    ) -> Decision:
        for rule in self._deny:
            if rule.matches(caller, roles, callee, endpoint, chain):
                return self._verdict(rule.name, "deny")
        for rule in self._allow:
            if rule.matches(caller, roles, callee, endpoint, chain):
                return self._verdict(rule.name, "allow")
        return self._default

    def reentrant(self, agent: str) -> bool:
        """Whether a delegation chain may come back to ``agent`` (``spec.delegation``)."""
        return self._reentrant.matches(agent)

    def explain(
        self,
        caller_agent: str,
        caller_roles: tuple[str, ...],
        callee_agent: str,
        endpoint: str,
        chain: Chain | None = None,
    ) -> str:
        """``decide(...)`` as one line naming the rule, the source and the revision."""
        d = self.decide(caller_agent, caller_roles, callee_agent, endpoint, chain)
        return d.explain(self._source, self._revision)

    def endpoint_settings(self, agent: str, endpoint: str) -> EndpointPolicy | None:
        """The settings of the most specific ``spec.endpoints`` key matching ``agent.endpoint``.

        Specificity: an exact agent part beats a glob, then an exact endpoint part beats a glob,
        then the key with more literal (non-wildcard) characters, then the earlier key in the
        file. Settings are not merged across keys: the winner's settings apply alone.
        """
        return self._setting(agent, endpoint)[1]

    def _setting(self, agent: str, endpoint: str) -> tuple[str | None, EndpointPolicy | None]:
        """The winning ``spec.endpoints`` key and its settings (``endpoint_settings``)."""
        key = (agent, endpoint)
        hit = self._settings.get(key)
        if hit is not None:
            return hit
        found: tuple[str | None, EndpointPolicy | None] = (None, None)
        for agents, endpoints, name, ep in self._endpoints:
            if agents.matches(agent) and endpoints.matches(endpoint):
                found = (name, ep)
                break
        if len(self._settings) >= _CACHE_MAX:
            self._settings.clear()
        self._settings[key] = found
        return found

    def timeout_for(self, agent: str, endpoint: str) -> float | None:
        """The endpoint's timeout, else ``defaults.timeout``, else ``None`` (the caller's own
        default applies)."""
        ep = self.endpoint_settings(agent, endpoint)
        if ep is not None and ep.timeout is not None:
            return ep.timeout
        return None if self._policy is None else self._policy.spec.defaults.timeout

    def route(
        self,
        caller_agent: str,
        caller_roles: tuple[str, ...],
        callee_agent: str,
        endpoint: str,
        chain: Chain | None = None,
    ) -> Route:
        """Everything policy says about one call, resolved once: the decision (``decide``) and
        the settings of ``callee_agent.endpoint`` (``endpoint_settings``, ``timeout_for``).

        Args:
            caller_agent: the verified caller's agent name.
            caller_roles: the roles in the caller's certificate.
            callee_agent: the agent called.
            endpoint: the endpoint called.
            chain: the call's delegation chain (origin, path, depth, scopes), for rules that
                look at it; ``None``: a direct call.
        """
        if chain is not None and self.on_chain:
            key: tuple[object, ...] = (caller_agent, caller_roles, callee_agent, endpoint, chain)
        else:
            key = (caller_agent, caller_roles, callee_agent, endpoint)
            chain = None
        hit = self._routes.get(key)
        if hit is not None:
            return hit
        destination, settings = self._setting(callee_agent, endpoint)
        if settings is not None and settings.access_log is not None:
            access_log = settings.access_log
        else:
            access_log = self._policy is not None and self._policy.spec.defaults.access_log
        route = Route(
            decision=self.decide(caller_agent, caller_roles, callee_agent, endpoint, chain),
            settings=settings,
            timeout=self.timeout_for(callee_agent, endpoint),
            retries=None if settings is None else settings.retries,
            rate_limit=None if settings is None else settings.rate_limit,
            access_log=access_log,
            max_queue=None if settings is None else settings.max_queue,
            destination=destination,
            traffic=tuple(
                t
                for c, t in self._traffic
                if c.matches(caller_agent, caller_roles, callee_agent, endpoint)
            ),
        )
        if len(self._routes) >= _CACHE_MAX:
            self._routes.clear()
        self._routes[key] = route
        return route
