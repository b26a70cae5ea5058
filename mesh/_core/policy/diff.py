"""What changes when one policy replaces another, as lines for people (``mesh-policy diff``,
``apply`` and the audit record of a change). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from mesh._core.policy.model import (
    WITH_UNITS,
    Defaults,
    DelegationSpec,
    EndpointPolicy,
    Policy,
    Rule,
    TrafficRoute,
    format_duration,
    format_rate,
)

# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float | None) -> str:
    return "none" if seconds is None else format_duration(seconds)


def _fmt_rate(rate: float | None) -> str:
    return "none" if rate is None else format_rate(rate)


def _rule_summary(rule: Rule) -> str:
    m = rule.match
    text = (
        f"{rule.effect} callers=[{', '.join(m.callers)}] agent={m.agent} "
        f"endpoints=[{', '.join(m.endpoints)}]"
    )
    for name in ("origins", "via", "scopes"):
        values = getattr(m, name)
        if values is not None:
            text += f" {name}=[{', '.join(values)}]"
    if m.max_depth is not None:
        text += f" max_depth={m.max_depth}"
    return text


def _delegation_fields(spec: DelegationSpec | None) -> dict[str, str]:
    d = spec or DelegationSpec()
    return {"max_depth": str(d.max_depth), "reentrant": f"[{', '.join(d.reentrant)}]"}


def _endpoint_fields(ep: EndpointPolicy) -> dict[str, str]:
    out: dict[str, str] = {}
    if ep.timeout is not None:
        out["timeout"] = _fmt_duration(ep.timeout)
    if ep.retries is not None:
        out["retries.attempts"] = str(ep.retries.attempts)
        if ep.retries.per_try_timeout is not None:
            out["retries.per_try_timeout"] = _fmt_duration(ep.retries.per_try_timeout)
    if ep.rate_limit is not None:
        rl = ep.rate_limit
        if rl.per_caller is not None:
            out["rate_limit.per_caller"] = _fmt_rate(rl.per_caller)
            out["rate_limit.burst"] = str(rl.caller_burst)
        if rl.total is not None:
            out["rate_limit.total"] = _fmt_rate(rl.total)
            out["rate_limit.total_burst"] = str(rl.total_capacity)
        if rl.per_origin is not None:
            out["rate_limit.per_origin"] = _fmt_rate(rl.per_origin)
    if ep.max_queue is not None:
        out["max_queue"] = str(ep.max_queue)
    if ep.access_log is not None:
        out["access_log"] = str(ep.access_log).lower()
    for name in ("circuit_breaker", "outlier_detection"):
        block = getattr(ep, name)
        if block is not None:
            out.update(_flat(name, block))
    if ep.load_balancer is not None:
        out["load_balancer"] = ep.load_balancer
    return out


def _flat(prefix: str, model: BaseModel) -> dict[str, str]:
    """A model's fields as ``prefix.field`` -> text as a policy file writes it (durations with
    units, nested blocks as dotted keys, lists as compact JSON); unset fields left out."""
    out: dict[str, str] = {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        elif value is not None and value != []:
            out[path] = _text(_clean(value))

    walk(prefix, model.model_dump(mode="json", context={WITH_UNITS: True}))
    return out


def _clean(value: Any) -> Any:
    """``value`` without ``None``, empty maps and empty lists (defaults nobody wrote)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _route_fields(route: TrafficRoute) -> dict[str, str]:
    return {
        k.removeprefix("route."): v for k, v in _flat("route", route).items() if k != "route.name"
    }


def _defaults_fields(d: Defaults) -> dict[str, str]:
    return {
        "authorization": d.authorization,
        "mode": d.mode,
        "timeout": _fmt_duration(d.timeout),
        "access_log": str(d.access_log).lower(),
    }


def _changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "none"), new.get(key, "none")
        if a != b:
            out.append(f"{key} {a} -> {b}")
    return out


def diff_policies(old: Policy | None, new: Policy) -> list[str]:
    """What changes when ``new`` replaces ``old``, as human-readable lines (empty: no change).

    Rules are matched by name, endpoint settings by key. ``old=None`` (no policy installed yet)
    lists everything in ``new`` as added.
    """
    lines: list[str] = []
    if old is None:
        lines.append(f'policy "{new.metadata.name}" (no policy installed before)')
        d = _defaults_fields(new.spec.defaults)
        lines.append("defaults: " + " ".join(f"{k}={v}" for k, v in d.items()))
        if new.spec.delegation is not None:
            limits = _delegation_fields(new.spec.delegation)
            lines.append("delegation: " + " ".join(f"{k}={v}" for k, v in limits.items()))
        old_rules: dict[str, Rule] = {}
        old_eps: dict[str, EndpointPolicy] = {}
    else:
        if old.metadata.name != new.metadata.name:
            lines.append(f"metadata.name {old.metadata.name} -> {new.metadata.name}")
        if old.metadata.description != new.metadata.description:
            lines.append(
                f"metadata.description {old.metadata.description!r} -> {new.metadata.description!r}"
            )
        lines += [
            f"defaults.{c}"
            for c in _changes(
                _defaults_fields(old.spec.defaults), _defaults_fields(new.spec.defaults)
            )
        ]
        lines += [
            f"delegation.{c}"
            for c in _changes(
                _delegation_fields(old.spec.delegation), _delegation_fields(new.spec.delegation)
            )
        ]
        old_rules = {r.name: r for r in old.spec.rules}
        old_eps = dict(old.spec.endpoints)
    new_rules = {r.name: r for r in new.spec.rules}
    for name, rule in new_rules.items():
        before = old_rules.get(name)
        if before is None:
            lines.append(f'rule "{name}" added: {_rule_summary(rule)}')
        elif before != rule:
            lines.append(f'rule "{name}" changed: {_rule_summary(before)} -> {_rule_summary(rule)}')
    lines += [f'rule "{name}" removed' for name in old_rules if name not in new_rules]
    common_old = [n for n in old_rules if n in new_rules]
    common_new = [n for n in new_rules if n in old_rules]
    if common_old != common_new:
        lines.append(f"rule order changed: {', '.join(common_old)} -> {', '.join(common_new)}")
    for key, ep in new.spec.endpoints.items():
        prev = old_eps.get(key)
        if prev is None:
            fields = " ".join(f"{k}={v}" for k, v in _endpoint_fields(ep).items())
            lines.append(f"endpoint {key} added: {fields or '(no settings)'}")
        elif prev != ep:
            changes = _changes(_endpoint_fields(prev), _endpoint_fields(ep))
            lines.append(f"endpoint {key} changed: {'; '.join(changes)}")
    lines += [f"endpoint {key} removed" for key in old_eps if key not in new.spec.endpoints]
    lines += _route_changes(() if old is None else old.spec.routes, new.spec.routes)
    return lines


def _route_changes(old: Sequence[TrafficRoute], new: Sequence[TrafficRoute]) -> list[str]:
    """Routes matched by name: added, changed (field by field), removed, and their order (the
    first matching route applies, so order matters as it does for rules)."""
    lines: list[str] = []
    before = {r.name: r for r in old}
    after = {r.name: r for r in new}
    for name, route in after.items():
        prev = before.get(name)
        fields = _route_fields(route)
        if prev is None:
            lines.append(
                f'route "{name}" added: ' + " ".join(f"{k}={v}" for k, v in fields.items())
            )
        elif prev != route:
            lines.append(
                f'route "{name}" changed: ' + "; ".join(_changes(_route_fields(prev), fields))
            )
    lines += [f'route "{name}" removed' for name in before if name not in after]
    common_old = [n for n in before if n in after]
    common_new = [n for n in after if n in before]
    if common_old != common_new:
        lines.append(f"route order changed: {', '.join(common_old)} -> {', '.join(common_new)}")
    return lines
