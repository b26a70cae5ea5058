"""Names a policy uses that nothing live has: the analysis behind ``validate --live`` and
``apply`` (``istioctl analyze`` for mesh policies).

A rule, an endpoints key or a traffic route that names an agent, an endpoint or a role no live
instance has is usually a typo: the rule silently never matches. So is a route's split backend
or mirror naming a version or a label no live instance of its agent announces: the backend's
share of the calls goes to the others (or nowhere), the mirror's copies fail.
``analyze_policy`` compares the names and patterns of a policy with an ``Inventory`` of the
live directory and returns one ``Finding`` per unknown plain name, with close matches
(``difflib``). Patterns (``*``, ``drop*``, ``role:ops-*``, a version ``2.*``) are never
reported: a glob is open-ended on purpose (a deny rule on ``delete*`` guards endpoints nobody
has written yet). They still decide whether an endpoint is known: an endpoint is looked up in
every live agent the rule's agent pattern matches, as the engine matches names
(case-sensitive ``fnmatch``). ``role:<name>`` callers are looked up in the roles of the live
instances' certificates; a version or a label in what the live instances of the backend's (or
the mirror's) agent announce. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from mesh._core.policy.model import Policy, Subset, TrafficRoute, _is_glob
from mesh._core.records import InstanceRecord

__all__ = ["Finding", "Inventory", "analyze_policy"]

Kind = Literal["agent", "endpoint", "role", "version", "label"]


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the live directory has: agents, each agent's endpoints, versions and labels, and
    the roles certificates carry.

    Attributes:
        endpoints: every live agent's name and the endpoint names its instances announce.
        roles: every role in a live instance's certificate.
        versions: per agent, the versions its instances announce; an agent missing here is
            not checked for versions (``Inventory.of`` gives every live agent).
        labels: per agent, the ``(key, value)`` labels its instances announce; an agent
            missing here is not checked for labels.
    """

    endpoints: Mapping[str, frozenset[str]] = field(default_factory=dict)
    roles: frozenset[str] = frozenset()
    versions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    labels: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    @property
    def agents(self) -> frozenset[str]:
        """Every live agent's name."""
        return frozenset(self.endpoints)

    @classmethod
    def of(cls, records: Iterable[InstanceRecord]) -> Inventory:
        """The inventory of verified directory records."""
        endpoints: dict[str, set[str]] = {}
        roles: set[str] = set()
        versions: dict[str, set[str]] = {}
        labels: dict[str, set[tuple[str, str]]] = {}
        for rec in records:
            endpoints.setdefault(rec.agent, set()).update(rec.endpoints)
            roles.update(rec.certificate.roles)
            versions.setdefault(rec.agent, set()).add(rec.version)
            labels.setdefault(rec.agent, set()).update(rec.labels.items())
        return cls(
            {a: frozenset(e) for a, e in endpoints.items()},
            frozenset(roles),
            {a: frozenset(v) for a, v in versions.items()},
            {a: frozenset(kv) for a, kv in labels.items()},
        )


@dataclass(frozen=True, slots=True)
class Finding:
    """A name a policy uses that nothing live has.

    Attributes:
        where: what uses it: ``rule "x"``, ``endpoints key "a.b"`` or ``route "x"``.
        kind: ``"agent"``, ``"endpoint"``, ``"role"``, ``"version"`` or ``"label"``.
        name: the name as written (a label as ``key=value``).
        agent: for an endpoint, a version or a label, the agent (pattern) it belongs to.
        suggestions: live names close to ``name``, closest first.
        loc: where in the document the name is written (``spec.routes[0].split[1].version``
            as a path), when it names a subset; ``()`` otherwise.
    """

    where: str
    kind: Kind
    name: str
    agent: str | None = None
    suggestions: tuple[str, ...] = ()
    loc: tuple[str | int, ...] = ()

    @property
    def blocking(self) -> bool:
        """A split backend or a mirror no live instance is in (a version or a label): its calls
        would go elsewhere, or its copies fail. ``apply`` refuses it unless told it is a
        rollout ahead of the instances; other findings are warnings."""
        return self.kind in ("version", "label")

    @property
    def message(self) -> str:
        """``rule "x" names agent "librarain", which no live instance has (did you mean
        "librarian"?)``."""
        what = f'{self.kind} "{self.name}"'
        if self.agent is not None:
            what += f' of agent "{self.agent}"'
        has = (
            "no live instance's certificate carries"
            if self.kind == "role"
            else "no live instance has"
        )
        text = f"{self.where} names {what}, which {has}"
        if self.suggestions:
            quoted = " or ".join(f'"{s}"' for s in self.suggestions)
            text += f" (did you mean {quoted}?)"
        return text


def _matching(pattern: str, names: Iterable[str]) -> list[str]:
    if pattern == "*":
        return sorted(names)
    if _is_glob(pattern):
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
    return [pattern] if pattern in names else []


def _unknown(
    where: str, kind: Kind, name: str, known: frozenset[str], agent: str | None = None
) -> Finding | None:
    """A finding when the plain name ``name`` is none of ``known`` (a glob: never)."""
    if _is_glob(name) or name in known:
        return None
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.7)
    return Finding(where, kind, name, agent=agent, suggestions=tuple(close))


def _endpoints(
    where: str, agent: str, endpoints: Iterable[str], inventory: Inventory
) -> list[Finding]:
    """Endpoint names none of the live agents ``agent`` matches announces (none reported
    when ``agent`` matches no live agent: that is reported about the agent)."""
    agents = _matching(agent, inventory.agents)
    if not agents:
        return []
    offered = frozenset(e for a in agents for e in inventory.endpoints[a])
    found = (_unknown(where, "endpoint", e, offered, agent) for e in endpoints)
    return [f for f in found if f is not None]


def _callers(where: str, callers: Iterable[str], inventory: Inventory) -> list[Finding]:
    """The caller agents and ``role:`` roles no live instance has."""
    found: list[Finding] = []
    for caller in callers:
        if caller.startswith("role:"):
            f = _unknown(where, "role", caller[5:], inventory.roles)
        else:
            f = _unknown(where, "agent", caller, inventory.agents)
        if f is not None:
            found.append(f)
    return found


def _subset(
    where: str, agent: str, subset: Subset, inventory: Inventory, loc: tuple[str | int, ...]
) -> list[Finding]:
    """The version (when plain) and the labels of ``subset`` (written at ``loc``) that no live
    instance of ``agent`` announces (none when ``agent`` is not live: that is reported about
    the agent)."""
    if agent not in inventory.agents:
        return []
    found: list[Finding] = []
    versions = inventory.versions.get(agent)
    if subset.version is not None and versions is not None:
        f = _unknown(where, "version", subset.version, versions, agent)
        if f is not None:
            found.append(dataclasses.replace(f, loc=(*loc, "version")))
    labels = inventory.labels.get(agent)
    if labels is not None:
        pairs = sorted(f"{k}={v}" for k, v in labels)
        for key, value in subset.labels.items():
            if (key, value) not in labels:  # labels match exactly: no globs
                label = f"{key}={value}"
                close = difflib.get_close_matches(label, pairs, n=3, cutoff=0.7)
                at = (*loc, "labels", key)
                found.append(Finding(where, "label", label, agent, tuple(close), at))
    return found


def _route(route: TrafficRoute, index: int, inventory: Inventory) -> list[Finding]:
    """What a traffic route names that nothing live has: its callers, its callee agent and
    endpoints, its split backends' versions and labels, and its mirror (the agent, its
    version and labels, and the route's endpoints, which the mirror is sent)."""
    where = f'route "{route.name}"'
    m = route.match
    found = _callers(where, m.callers, inventory)
    f = _unknown(where, "agent", m.agent, inventory.agents)
    if f is not None:
        found.append(f)
    found.extend(_endpoints(where, m.agent, m.endpoints, inventory))
    loc: tuple[str | int, ...] = ("spec", "routes", index)
    for i, backend in enumerate(route.split):
        found.extend(_subset(where, m.agent, backend, inventory, (*loc, "split", i)))
    mirror = route.mirror
    if mirror is not None:
        f = _unknown(where, "agent", mirror.agent, inventory.agents)
        if f is not None:
            found.append(f)
        found.extend(_endpoints(where, mirror.agent, m.endpoints, inventory))
        found.extend(_subset(where, mirror.agent, mirror, inventory, (*loc, "mirror")))
    return found


def analyze_policy(policy: Policy, inventory: Inventory) -> list[Finding]:
    """The agents, endpoints, roles, versions and labels ``policy`` names that nothing in
    ``inventory`` has.

    Rules are checked in file order (callers, then the callee agent, then its endpoints), then
    the keys of ``spec.endpoints``, then the traffic routes in file order (as rules, then each
    split backend's version and labels, then the mirror's agent, the route's endpoints on it,
    and its version and labels); each unknown plain name is reported once per rule, key or
    route (patterns never are, nor version globs).

    Args:
        policy: a validated policy.
        inventory: what the live directory has (``Inventory.of(records)``).

    Returns:
        One ``Finding`` per unknown name or pattern, in that order (empty when all are known).
    """
    found: list[Finding] = []
    for rule in policy.spec.rules:
        where = f'rule "{rule.name}"'
        m = rule.match
        found.extend(_callers(where, m.callers, inventory))
        f = _unknown(where, "agent", m.agent, inventory.agents)
        if f is not None:
            found.append(f)
        found.extend(_endpoints(where, m.agent, m.endpoints, inventory))
    for key in policy.spec.endpoints:
        where = f'endpoints key "{key}"'
        agent, endpoint = key.split(".")
        f = _unknown(where, "agent", agent, inventory.agents)
        if f is not None:
            found.append(f)
        found.extend(_endpoints(where, agent, [endpoint], inventory))
    for index, route in enumerate(policy.spec.routes):
        found.extend(_route(route, index, inventory))
    unique: dict[tuple[str, str, str, str | None], Finding] = {}
    for f in found:
        unique.setdefault((f.where, f.kind, f.name, f.agent), f)
    return list(unique.values())
