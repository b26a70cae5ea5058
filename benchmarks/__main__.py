"""``python -m benchmarks``: measure the mesh against raw nats-py and FastStream.

Starts its own nats-server; writes docs/benchmarks.md and docs/benchmarks.png (``--out``), and
the raw numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from . import NOT_MEASURED, SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"

FULL = {"rounds": 3, "seconds": 3.0, "warmup": 0.5, "extra_agents": 10, "applies": 10}
QUICK = {"rounds": 1, "seconds": 0.6, "warmup": 0.2, "extra_agents": 10, "applies": 3}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one short round: under a minute")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="PATH",
        help="markdown page to write; the chart goes beside it as .png (default: %(default)s)",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument(
        "--scenarios",
        default="",
        help="comma-separated shell patterns of scenario names, e.g. 'reqreply-seq-*' (all)",
    )
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--seconds", type=float, help="override the seconds per measurement")
    p.add_argument(
        "--applies", type=int, help="override the policy revisions applied per round (policy-*)"
    )
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="do not measure: render --out from a JSON file written by --json",
    )
    return p


def _write(data: dict[str, Any], out: Path, json_path: Path | None) -> None:
    from .report import render_chart, render_markdown, write_json
    from .sections import keep

    if json_path is not None:
        write_json(json_path, data)
        print(f"wrote {json_path}", file=sys.stderr)
    chart = out.with_suffix(".png")
    render_chart(data, chart)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_markdown(data, chart.name)
    out.write_text(keep(out.read_text(), page) if out.exists() else page)
    print(f"wrote {out} and {chart}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        _write(json.loads(args.from_json.read_text()), args.out, args.json)
        return 0

    from .machine import machine_info
    from .runner import Settings, run, select_scenarios

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        print(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    systems = [s for s in SYSTEMS if s in systems]
    patterns = [p.strip() for p in args.scenarios.split(",") if p.strip()]
    scenarios = select_scenarios(patterns)
    if not scenarios:
        print(f"no scenario matches {patterns}", file=sys.stderr)
        return 2
    preset = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        preset["rounds"] = args.rounds
    if args.seconds is not None:
        preset["seconds"] = args.seconds
    if args.applies is not None:
        preset["applies"] = args.applies
    if preset["applies"] < 1:
        print("--applies must be at least 1", file=sys.stderr)
        return 2
    settings = Settings(
        rounds=int(preset["rounds"]),
        seconds=float(preset["seconds"]),
        warmup=float(preset["warmup"]),
        extra_agents=int(preset["extra_agents"]),
        applies=int(preset["applies"]),
    )

    started = time.perf_counter()
    results = asyncio.run(run(systems, scenarios, settings))
    elapsed = time.perf_counter() - started
    data: dict[str, Any] = {
        "machine": machine_info(),
        "command": " ".join(["python -m benchmarks", *map(shlex.quote, argv)]).strip(),
        "mode": "quick" if args.quick else "full",
        "settings": {
            "rounds": settings.rounds,
            "seconds": settings.seconds,
            "warmup": settings.warmup,
            "extra_agents": settings.extra_agents,
            "applies": settings.applies,
            "systems": systems,
            "elapsed_s": round(elapsed, 1),
        },
        "scenarios": {
            s.name: s.description for s in scenarios if not s.mesh_only or "mesh" in systems
        },
        "not_measured": NOT_MEASURED,
        "results": results,
    }
    _write(data, args.out, args.json)
    print(f"done in {elapsed:.1f} s", file=sys.stderr)
    failed = [r for r in results if "errors" in r and r.get("rounds", 0) == 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
