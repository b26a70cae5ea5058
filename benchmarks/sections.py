"""Sections of docs/benchmarks.md written by other benchmark commands (``python -m
benchmarks.scale``, ``python -m benchmarks.reliability``): each one replaces its own block, and
``python -m benchmarks`` keeps every block when it rewrites the rest of the page."""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(
    r"<!-- begin section (?P<name>[a-z0-9-]+) -->\n.*?<!-- end section (?P=name) -->\n",
    re.S,
)


def blocks(text: str) -> dict[str, str]:
    """The kept sections of a page, by name, each with its markers."""
    return {m["name"]: m[0] for m in _BLOCK.finditer(text)}


def block(name: str, markdown: str) -> str:
    """``markdown`` between the markers of section ``name``."""
    return f"<!-- begin section {name} -->\n{markdown.rstrip()}\n<!-- end section {name} -->\n"


def keep(old_page: str, new_page: str) -> str:
    """``new_page`` with the sections of ``old_page`` it lacks appended."""
    missing = [b for name, b in blocks(old_page).items() if name not in blocks(new_page)]
    return new_page.rstrip() + "\n\n" + "\n".join(missing) if missing else new_page


def write_section(path: Path, name: str, markdown: str) -> None:
    """Put section ``name`` into the page at ``path``: in place of its earlier block, else at
    the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = block(name, markdown)
    found = blocks(text).get(name)
    text = text.replace(found, new) if found else text.rstrip() + "\n\n" + new
    path.write_text(text)
