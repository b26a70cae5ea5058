"""Export the example agents' published endpoint schemas: ``make schemas``, or
``python schemas/export_endpoints.py`` (``--check`` only says whether the files are current).

Every ``mesh.Agent`` defined at the top level of ``examples/*.py`` gets one file per endpoint,
``schemas/endpoints/<agent>.<endpoint>.json``: its input and output JSON Schemas (of each chunk,
for a streaming endpoint), whether it streams and is idempotent, and the hash its directory
records carry (the value a caller pins, ``MeshConfig.schema_pins``). ``tests/unit/
test_schemas.py`` fails when a file is missing, stale or left over.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import mesh

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "schemas" / "endpoints"
EXAMPLES = REPO / "examples"


def example_agents() -> list[mesh.Agent]:
    """The agents of ``examples/*.py`` (not its tests), sorted by name."""
    agents: dict[str, mesh.Agent] = {}
    for path in sorted(EXAMPLES.glob("*.py")):
        if path.stem.startswith(("_", "test_")) or path.stem == "conftest":
            continue
        module = importlib.import_module(f"mesh_examples.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, mesh.Agent):
                agents[value.name] = value
    return [agents[name] for name in sorted(agents)]


def rendered() -> dict[str, str]:
    """File name to its text: pretty JSON, sorted keys, a trailing newline."""
    files = {}
    for agent in example_agents():
        for name, schema in agent.schemas().items():
            document = {"agent": agent.name, "endpoint": name, **schema.document()}
            del document["name"]
            text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)
            files[f"{agent.name}.{name}.json"] = text + "\n"
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python schemas/export_endpoints.py")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    files = rendered()
    present = {p.name for p in OUT.glob("*.json")} if OUT.is_dir() else set()
    stale = sorted(
        name
        for name in files.keys() | present
        if name not in files
        or name not in present
        or (OUT / name).read_text(encoding="utf-8") != files[name]
    )
    if args.check:
        for name in stale:
            print(f"schemas/endpoints/{name} is out of date", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name in stale:
        if name in files:
            (OUT / name).write_text(files[name], encoding="utf-8")
            print(f"wrote schemas/endpoints/{name}", file=sys.stderr)
        else:
            (OUT / name).unlink()
            print(f"removed schemas/endpoints/{name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
