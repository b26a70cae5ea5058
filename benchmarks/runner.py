"""The scenarios, and running them: systems interleaved within each scenario, rounds repeated,
medians of rounds reported."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.testing import NatsServer

from . import loads
from .callee import RemoteCallee
from .footprint import footprint_in_child
from .payload import SIZES, body_of
from .propagation import HEARTBEAT, STOP_LIMIT, TTL, propagation_in_child
from .stats import median_of_rounds, percentile
from .systems import SYSTEM_CLASSES, System

__all__ = ["SCENARIOS", "Scenario", "Settings", "run", "select_scenarios"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured situation. ``kind``: ``requests``, ``events``, or (mesh only) ``footprint``
    or ``policy`` (``agents``: how many receive each policy revision)."""

    name: str
    kind: str
    description: str
    size: int = 0
    in_flight: int = 1
    remote: bool = False
    unit: str = ""
    agents: int = 0

    @property
    def mesh_only(self) -> bool:
        return self.kind in ("footprint", "policy")


def _scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for label, size in SIZES.items():
        out.append(
            Scenario(
                f"reqreply-seq-{label}",
                "requests",
                f"one caller, one request at a time, {label} body, callee in the same process",
                size,
            )
        )
        if label == "256B":
            out.append(
                Scenario(
                    f"reqreply-seq-{label}-2proc",
                    "requests",
                    f"one request at a time, {label} body, callee in its own process",
                    size,
                    remote=True,
                )
            )
        out.append(
            Scenario(
                f"reqreply-64-{label}",
                "requests",
                f"64 requests in flight, {label} body, caller and callee in one process",
                size,
                64,
            )
        )
        out.append(
            Scenario(
                f"reqreply-64-{label}-2proc",
                "requests",
                f"64 requests in flight, {label} body, callee in its own process",
                size,
                64,
                remote=True,
            )
        )
    out.append(
        Scenario(
            "events-256B",
            "events",
            "one publisher, one subscriber (same process), 256 B events, rate at the subscriber",
            256,
        )
    )
    out += [
        Scenario(
            "mesh-start-to-ready",
            "footprint",
            "seconds from Mesh() to start() returning, first agent of a fresh process",
            unit="s",
        ),
        Scenario(
            "mesh-rss-one-agent",
            "footprint",
            "resident memory of a process running one agent",
            unit="MB",
        ),
        Scenario(
            "mesh-rss-per-extra-agent",
            "footprint",
            "resident memory added per extra agent in the same process",
            unit="MB",
        ),
    ]
    for n in POLICY_AGENTS:
        out += [
            Scenario(
                f"policy-propagation-{n}",
                "policy",
                f"apply a policy revision at the registry -> every one of {n} agents runs it "
                "(checked in each agent's process)",
                unit="ms",
                agents=n,
            ),
            Scenario(
                f"policy-ack-{n}",
                "policy",
                f"apply a policy revision at the registry -> every one of {n} agents' directory "
                "records acknowledges it, as the admin's directory (`mesh-policy agents`) shows",
                unit="ms",
                agents=n,
            ),
        ]
    return out


POLICY_AGENTS = (10, 100)
SCENARIOS = _scenarios()


def select_scenarios(patterns: list[str] | None) -> list[Scenario]:
    """Scenarios whose name matches any of the shell-style ``patterns`` (all if none)."""
    if not patterns:
        return list(SCENARIOS)
    return [s for s in SCENARIOS if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    seconds: float
    warmup: float
    extra_agents: int
    applies: int = 10
    """Measured policy revisions per round and agent count (after one warm-up revision)."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _brief(m: dict[str, float]) -> str:
    parts = []
    if "throughput_per_s" in m:
        parts.append(f"{m['throughput_per_s']:,.0f}/s")
    if "p50_ms" in m:
        parts.append(f"p50 {m['p50_ms']:.3f} ms p99 {m['p99_ms']:.3f} ms")
    return " ".join(parts)


async def _measure(sc: Scenario, system: System, settings: Settings) -> dict[str, float]:
    body = body_of(sc.size)
    if sc.kind == "requests":
        coro = loads.requests(
            system.call(body, remote=sc.remote),
            in_flight=sc.in_flight,
            seconds=settings.seconds,
            warmup=settings.warmup,
        )
    else:
        coro = loads.events(
            system.publish(body), system.sink, seconds=settings.seconds, warmup=settings.warmup
        )
    return await asyncio.wait_for(coro, settings.seconds + settings.warmup + 60.0)


FOOTPRINT_KEYS = {
    "mesh-start-to-ready": ("start_s", "start_more_s"),
    "mesh-rss-one-agent": ("rss_one_mb", None),
    "mesh-rss-per-extra-agent": ("rss_per_extra_mb", None),
}


async def run(
    systems: list[str], scenarios: list[Scenario], settings: Settings
) -> list[dict[str, Any]]:
    """Measure every scenario on every system; return one result per (scenario, system)."""
    samples: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    errors: dict[tuple[str, str], list[str]] = defaultdict(list)
    shared = [s for s in scenarios if not s.mesh_only]
    footprint = [s for s in scenarios if s.kind == "footprint" and "mesh" in systems]
    policy = [s for s in scenarios if s.kind == "policy" and "mesh" in systems]
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-")))
        srv = await stack.enter_async_context(NatsServer())
        _say(f"nats-server at {srv.url}")
        opened: dict[str, System] = {}
        for name in systems:
            system = SYSTEM_CLASSES[name]()
            stack.push_async_callback(system.close)
            await system.open(srv.url, workdir)
            opened[name] = system
        if any(s.remote for s in shared):
            remotes = [
                RemoteCallee(name, srv.url, opened[name].remote_args(workdir)) for name in systems
            ]
            for remote in remotes:
                stack.push_async_callback(remote.stop)
            await asyncio.gather(*(r.start() for r in remotes))
            for name in systems:
                await opened[name].remote_ready()
            _say(
                "callees in their own processes: "
                + ", ".join(f"{r.system} pid {r.pid}" for r in remotes)
            )
        for rnd in range(settings.rounds):
            shift = rnd % len(systems)
            order = systems[shift:] + systems[:shift]
            for sc in shared:
                for name in order:
                    key = (sc.name, name)
                    try:
                        m = await _measure(sc, opened[name], settings)
                    except Exception as exc:
                        errors[key].append(f"{type(exc).__name__}: {exc}")
                        _say(f"[{rnd + 1}/{settings.rounds}] {sc.name:28} {name:10} FAILED {exc!r}")
                        continue
                    samples[key].append(m)
                    _say(f"[{rnd + 1}/{settings.rounds}] {sc.name:28} {name:10} {_brief(m)}")
            if footprint:
                try:
                    fp = await footprint_in_child(srv.url, settings.extra_agents)
                except Exception as exc:
                    for sc in footprint:
                        errors[(sc.name, "mesh")].append(f"{type(exc).__name__}: {exc}")
                    _say(f"[{rnd + 1}/{settings.rounds}] footprint FAILED {exc!r}")
                else:
                    _say(f"[{rnd + 1}/{settings.rounds}] footprint {fp}")
                    for sc in footprint:
                        main_key, more_key = FOOTPRINT_KEYS[sc.name]
                        m = {"value": fp[main_key]}
                        if more_key is not None:
                            m["value_more_agents"] = fp[more_key]
                        samples[(sc.name, "mesh")].append(m)
            for n in sorted({s.agents for s in policy}):
                await _policy_round(
                    [s for s in policy if s.agents == n], n, srv.url, rnd, settings, samples, errors
                )
    return _results(systems, shared + footprint + policy, samples, errors, settings)


POLICY_KEYS = {"policy-propagation": "applied_ms", "policy-ack": "acked_ms"}


def _spread(values: list[float]) -> dict[str, float]:
    ms = sorted(values)
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "samples": len(ms)}


async def _policy_round(
    scenarios: list[Scenario],
    n: int,
    url: str,
    rnd: int,
    settings: Settings,
    samples: dict[tuple[str, str], list[dict[str, float]]],
    errors: dict[tuple[str, str], list[str]],
) -> None:
    """One ``benchmarks.propagation`` child with ``n`` agents: its applies feed both the
    propagation and the acknowledgement scenario of ``n``."""
    tag = f"[{rnd + 1}/{settings.rounds}] policy {n} agents"
    try:
        got = await propagation_in_child(url, n, settings.applies, f"bench-prop-{n}-{rnd}")
    except Exception as exc:
        for sc in scenarios:
            errors[(sc.name, "mesh")].append(f"{type(exc).__name__}: {exc}")
        _say(f"{tag} FAILED {exc!r}")
        return
    applied, seen, acked, reply = (
        _spread(got[k]) for k in ("applied_ms", "applied_seen_ms", "acked_ms", "reply_ms")
    )
    stop, stuck = got["stop_s"], got.get("stuck_drains")
    if stop is not None:
        stopped = f"stopped in {stop:.2f} s"
    elif stuck is not None:
        stopped = f"{stuck} agents' drain did not finish in {STOP_LIMIT:g} s"
    else:
        stopped = "did not stop in time: killed"
    _say(
        f"{tag}: {n} agents started in {got['start_s']:.2f} s (all in the directory after "
        f"{got['ready_s']:.2f} s; heartbeat {HEARTBEAT:g} s, TTL {TTL:g} s), {stopped}"
    )
    _say(
        f"{tag}: {settings.applies} applies: all applied p50 {applied['p50_ms']:.1f} ms "
        f"p99 {applied['p99_ms']:.1f} ms (seen by waiting tasks: p50 {seen['p50_ms']:.1f} ms "
        f"p99 {seen['p99_ms']:.1f} ms); all acknowledged p50 {acked['p50_ms']:.1f} ms "
        f"p99 {acked['p99_ms']:.1f} ms; registry reply p50 {reply['p50_ms']:.1f} ms "
        f"p99 {reply['p99_ms']:.1f} ms"
    )
    for sc in scenarios:
        spread = _spread(got[POLICY_KEYS[sc.name.rpartition("-")[0]]])
        samples[(sc.name, "mesh")].append(
            {**spread, "agents_start_s": got["start_s"], "apply_reply_p50_ms": reply["p50_ms"]}
        )


def _results(
    systems: list[str],
    scenarios: list[Scenario],
    samples: dict[tuple[str, str], list[dict[str, float]]],
    errors: dict[tuple[str, str], list[str]],
    settings: Settings,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for sc in scenarios:
        for name in ["mesh"] if sc.mesh_only else systems:
            rounds = samples.get((sc.name, name), [])
            res: dict[str, Any] = {"scenario": sc.name, "system": name, "rounds": len(rounds)}
            if rounds:
                med = median_of_rounds(rounds)
                if sc.kind == "policy":
                    res["p50_ms"], res["p99_ms"] = med["p50_ms"], med["p99_ms"]
                    res["unit"] = sc.unit
                    res["agents"] = sc.agents
                    res["applies_per_round"] = int(med["samples"])
                    res["agents_start_s"] = med["agents_start_s"]
                    res["apply_reply_p50_ms"] = med["apply_reply_p50_ms"]
                elif sc.kind == "footprint":
                    res["value"] = med["value"]
                    res["unit"] = sc.unit
                    if "value_more_agents" in med:
                        res["value_more_agents"] = med["value_more_agents"]
                    if sc.name == "mesh-rss-per-extra-agent":
                        res["extra_agents"] = settings.extra_agents
                else:
                    res["throughput_per_s"] = med["throughput_per_s"]
                    for k in ("p50_ms", "p99_ms", "p999_ms"):
                        if k in med:
                            res[k] = med[k]
                    res["samples_per_round"] = int(med["samples"])
                    res["body_bytes"] = sc.size
                    if sc.kind == "requests":
                        res["in_flight"] = sc.in_flight
                        res["callee"] = "own process" if sc.remote else "same process"
            if errors.get((sc.name, name)):
                res["errors"] = errors[(sc.name, name)]
            results.append(res)
    return results
