"""The JSON Schema files in schemas/ match the pydantic models they are exported from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh._core.policy import policy_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# (file in schemas/, the function producing the schema, the command that regenerates the file)
EXPORTED: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    (
        "policy.schema.json",
        policy_schema,
        "python -m mesh._core.policy --export-schema schemas/policy.schema.json",
    ),
]


def render(schema: dict[str, Any]) -> str:
    """How schema files are written: pretty JSON, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize(("name", "make", "command"), EXPORTED, ids=[e[0] for e in EXPORTED])
def test_schema_file_matches_model(
    name: str, make: Callable[[], dict[str, Any]], command: str
) -> None:
    """A schema file that drifted from its model fails with the command that regenerates it."""
    path = SCHEMAS / name
    expected = render(make())
    actual = path.read_text(encoding="utf-8") if path.exists() else None

    assert actual == expected, (
        f"schemas/{name} is {'missing' if actual is None else 'out of date'} "
        f"with respect to the models; regenerate it with: {command}"
    )


def test_policy_schema_is_what_the_module_writes() -> None:
    """``python -m mesh._core.policy --export-schema`` writes ``render(policy_schema())``."""
    from mesh._core.policy import render_schema

    assert render_schema() == render(policy_schema())


def test_policy_schema_describes_the_examples() -> None:
    """The schema's top level names the fields the example policies use."""
    schema = policy_schema()

    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec"}
    assert schema["additionalProperties"] is False
    spec = set(schema["$defs"]["Spec"]["properties"])
    assert spec == {"defaults", "rules", "endpoints", "routes", "delegation"}


# --- endpoint schemas of the example agents (schemas/endpoints/, make schemas) ----------------


def _exporter() -> Any:
    """``schemas/export_endpoints.py`` as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "export_endpoints", SCHEMAS / "export_endpoints.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_endpoint_schema_files_match_the_example_agents() -> None:
    """Every endpoint of every example agent has its file in schemas/endpoints/, as the
    exporter writes it now, and no file is left over: drift fails with the command to run."""
    expected = _exporter().rendered()
    directory = SCHEMAS / "endpoints"
    present = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.json")}

    stale = sorted(n for n in expected.keys() | present.keys() if expected.get(n) != present.get(n))
    assert not stale, (
        f"schemas/endpoints/ is out of date for {stale}; regenerate it with: make schemas "
        "(python schemas/export_endpoints.py)"
    )
    assert {"researcher.answer.json", "librarian.lookup.json", "writer.draft.json"} <= set(present)


def test_endpoint_schema_files_carry_the_hash_of_their_schemas() -> None:
    """The hash in each file is the one recomputed from the schemas beside it, and the one the
    agent's directory records carry (``Agent.schemas``)."""
    from mesh._core.schemas import schema_hash
    from mesh_examples.research import researcher

    for path in (SCHEMAS / "endpoints").glob("*.json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["hash"] == schema_hash(doc["input"], doc["output"]), path.name
    answer = json.loads((SCHEMAS / "endpoints" / "researcher.answer.json").read_text())
    assert answer["hash"] == researcher.schemas()["answer"].hash
    assert answer["input"]["properties"]["text"]["maxLength"] == 2000
