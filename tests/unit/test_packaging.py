"""The package as installed: every folder of ``mesh`` is a listed package, so a wheel has it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_mesh_package_is_listed_in_pyproject() -> None:
    """A new sub-package under mesh/ must be added to pyproject's explicit package list."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "mesh").rglob("__init__.py")
    }
    assert found - listed == set()
    assert {p for p in listed if p.startswith("mesh.") or p == "mesh"} == found
