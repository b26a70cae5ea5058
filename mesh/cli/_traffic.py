"""What traffic management applies to one call, for ``mesh-policy explain``: the route the
call's metadata selects (split, affinity, timeout, retries, mirror, faults) and its destination's
settings (circuit breaker, outlier detection, balancer), as a document (``-o json``) and as
lines for people; and ``--meta key=value`` parsed as a call checks request metadata."""

from __future__ import annotations

from typing import Any

import click
from pydantic import BaseModel

from mesh import InvalidArgument, Policy, RetryPolicy, Timeouts
from mesh._core.envelope import check_metadata
from mesh._core.policy import PolicyEngine, Route
from mesh._core.policy.model import format_duration
from mesh._runtime.traffic import DEFAULT_MAX_PENDING

__all__ = ["parse_meta", "traffic_document", "traffic_lines", "uses_traffic"]


def parse_meta(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``--meta key=value`` (repeatable) as request metadata, checked as a call checks it."""
    metadata: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not key=value (e.g. track=beta)", ctx, param)
        if key in metadata:
            raise click.BadParameter(f"{key!r} is given twice", ctx, param)
        metadata[key] = value
    try:
        check_metadata(metadata)
    except InvalidArgument as exc:
        raise click.BadParameter(exc.message, ctx, param) from None
    return metadata


def uses_traffic(policy: Policy | None) -> bool:
    """Whether ``policy`` sets any traffic management (routes, or an endpoints key's circuit
    breaker, outlier detection or balancer); ``explain`` prints it only then."""
    if policy is None:
        return False
    spec = policy.spec
    return bool(spec.routes) or any(
        ep.circuit_breaker is not None
        or ep.outlier_detection is not None
        or ep.load_balancer is not None
        for ep in spec.endpoints.values()
    )


def traffic_document(
    engine: PolicyEngine,
    route: Route,
    caller: str,
    roles: tuple[str, ...],
    endpoint: str,
    md: dict[str, str],
) -> dict[str, Any]:
    """What traffic management applies to the call, as plain data (``explain -o json``):
    the selected route, where the timeout and retries come from, and the destination's
    settings (the winning endpoints key)."""
    policy = engine.policy
    tr = route.select(md)
    settings = route.settings
    chosen: dict[str, Any] | None = None
    timeout: dict[str, Any] = {"seconds": route.timeout, "source": "caller"}
    if settings is not None and settings.timeout is not None:
        timeout["source"] = "endpoints"
    elif route.timeout is not None:
        timeout["source"] = "defaults"
    retries: dict[str, Any] = {"attempts": None, "per_try_timeout": None, "source": "caller"}
    if route.retries is not None:
        retries = {**route.retries.model_dump(mode="json"), "source": "endpoints"}
    if tr is not None:
        assert policy is not None  # a route comes from a policy
        chosen = {
            "name": tr.name,
            "index": policy.spec.routes.index(tr),
            "metadata": dict(tr.match.metadata),
            "split": [b.model_dump(mode="json") for b in tr.split],
            "hash_on": tr.hash_on,
            "mirror": None,
            "fault": None if tr.fault is None else tr.fault.model_dump(mode="json"),
        }
        if tr.mirror is not None:
            shadow = engine.decide(caller, roles, tr.mirror.agent, endpoint)
            chosen["mirror"] = {
                **tr.mirror.model_dump(mode="json"),
                "decision": "ALLOW" if shadow.allowed else "DENY",
                "explanation": shadow.explain(),
            }
        if tr.timeout is not None:
            timeout = {"seconds": tr.timeout, "source": "route"}
        if tr.retries is not None:
            retries = {**tr.retries.model_dump(mode="json"), "source": "route"}
    unmatched = [] if tr is not None else route.traffic  # those needing other metadata
    lb_unset = settings is None or settings.load_balancer is None
    return {
        "route": chosen,
        "unmatched_routes": [
            {"name": t.name, "metadata": dict(t.match.metadata)} for t in unmatched
        ],
        "timeout": timeout,
        "retries": retries,
        "endpoints_key": route.destination,
        "circuit_breaker": _dump(route.circuit_breaker),
        "outlier_detection": _dump(route.outlier_detection),
        "load_balancer": {
            "name": route.load_balancer,
            "source": "default" if lb_unset else "endpoints",
        },
    }


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump(mode="json")


def _pairs(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _subset(doc: dict[str, Any]) -> str:
    """``version 2.0.0``, ``labels track=canary``, both, or ``any instance``."""
    parts = [] if doc.get("version") is None else [f"version {doc['version']}"]
    if doc.get("labels"):
        parts.append(f"labels {_pairs(doc['labels'])}")
    return " ".join(parts) or "any instance"


def traffic_lines(doc: dict[str, Any], call: str, md: dict[str, str]) -> list[str]:
    """``traffic_document``'s document for people: the route, then the destination of ``call``
    (``agent.endpoint``)."""
    tr = doc["route"]
    lines = []
    if tr is None:
        line = "no route matches: calls go to any live instance"
        waiting = [
            f'route "{t["name"]}" needs metadata {_pairs(t["metadata"])}'
            for t in doc["unmatched_routes"]
        ]
        lines.append(line + (f" ({'; '.join(waiting)})" if waiting else ""))
    else:
        when_md = f", metadata {_pairs(tr['metadata'])}" if tr["metadata"] else ""
        lines.append(f'route "{tr["name"]}" (spec.routes[{tr["index"]}]{when_md})')
        split = ", ".join(f"{b['weight']}% to {_subset(b)}" for b in tr["split"])
        lines.append(f"  split: {split or 'none: calls go to any live instance'}")
        lines.append(f"  hash_on: {_hash_on(tr['hash_on'], md)}")
    where = {
        "route": f'route "{tr["name"]}"' if tr else "",
        "endpoints": f'endpoints key "{doc["endpoints_key"]}"',
        "defaults": "defaults.timeout",
    }
    timeout = doc["timeout"]
    if timeout["source"] == "caller":
        shown = f"the caller's default ({format_duration(Timeouts().request)} unless configured)"
    else:
        shown = f"{format_duration(timeout['seconds'])} ({where[timeout['source']]})"
    lines.append(f"  timeout: {shown}")
    retries = doc["retries"]
    if retries["source"] == "caller":
        shown = f"the caller's default ({RetryPolicy().attempts} attempts unless configured)"
    else:
        per_try = retries["per_try_timeout"]
        limit = "no per-try limit" if per_try is None else f"{format_duration(per_try)} per try"
        shown = f"{retries['attempts']} attempts, {limit} ({where[retries['source']]})"
    lines.append(f"  retries: {shown}")
    if tr is not None:
        lines.append(f"  mirror: {_mirror(tr['mirror'])}")
        lines.append(f"  fault: {_fault(tr['fault'])}")
    key = doc["endpoints_key"]
    lines.append(f'endpoints key "{key}"' if key else f"no endpoints key matches {call}")
    lines.append(f"  circuit_breaker: {_circuit(doc['circuit_breaker'])}")
    lines.append(f"  outlier_detection: {_outliers(doc['outlier_detection'])}")
    lb = doc["load_balancer"]
    lines.append(
        f"  load_balancer: {lb['name']}" + (" (default)" if lb["source"] == "default" else "")
    )
    return lines


def _hash_on(hash_on: str | None, md: dict[str, str]) -> str:
    if hash_on is None:
        return "none (the balancer chooses each call's instance)"
    if hash_on == "idempotency_key":
        return "idempotency_key (a call without a key has no affinity)"
    key = hash_on[len("metadata.") :]
    if key in md:
        return f"{hash_on} (this call: {key}={md[key]})"
    return f"{hash_on} (this call has no {key}: no affinity)"


def _mirror(mirror: dict[str, Any] | None) -> str:
    if mirror is None:
        return "none"
    text = (
        f"{mirror['percent']:g}% copied to {mirror['agent']} ({_subset(mirror)}), replies dropped"
    )
    if mirror["decision"] == "DENY":
        text += f"; the copies are refused: {mirror['explanation']}"
    return text


def _fault(fault: dict[str, Any] | None) -> str:
    if fault is None:
        return "none"
    parts = []
    if fault["delay"] is not None:
        delay = fault["delay"]
        parts.append(f"delay {delay['percent']:g}% by {format_duration(delay['fixed'])}")
    if fault["abort"] is not None:
        abort = fault["abort"]
        parts.append(f"abort {abort['percent']:g}% with {abort['code']}")
    return "; ".join(parts)


def _circuit(cb: dict[str, Any] | None) -> str:
    if cb is None:
        return "none"
    text = (
        f"opens after {cb['consecutive_failures']} failures in a row, for "
        f"{format_duration(cb['open_for'])} (doubling at each reopening, at most "
        f"{format_duration(cb['max_open_for'])})"
    )
    if cb["max_concurrent"] is None:
        return text + "; no concurrency limit"
    pending = cb["max_pending"]
    waiting = f"{DEFAULT_MAX_PENDING} (default)" if pending is None else str(pending)
    return text + f"; max_concurrent {cb['max_concurrent']}, max_pending {waiting}"


def _outliers(od: dict[str, Any] | None) -> str:
    if od is None:
        return "none"
    return (
        f"ejects an instance after {od['consecutive_failures']} failures in a row, for "
        f"{format_duration(od['base_ejection_time'])} times the number of its ejections (at most "
        f"{format_duration(od['max_ejection_time'])}); at most "
        f"{od['max_ejection_percent']:g}% of instances at once"
    )
