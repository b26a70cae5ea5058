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
