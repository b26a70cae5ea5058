"""``-o table|json|yaml``: how the read commands of ``mesh-policy`` print what they found.

``table`` is for people (rich tables, colours, notes). ``json`` and ``yaml`` print the same
documented structure for scripts: plain keys, times as ISO 8601 UTC strings
(``2025-01-31T12:00:00Z``), never epoch numbers, and nothing on stdout but the document
(warnings go to stderr). A command that streams (``top --watch``, ``audit tail -f``) prints one
document per item instead: one JSON object a line (JSON Lines), or YAML documents each
opened by ``---``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import click
import yaml

from ._common import Args

FORMATS = ("table", "json", "yaml")


def output_option(aliases: Mapping[str, str] | None = None) -> click.Option:
    """``-o/--output table|json|yaml`` (default ``table``) of a read command.

    Args:
        aliases: other names accepted for a format (``check`` keeps ``text`` for ``table``).
    """
    names = dict(aliases or {})

    def canonical(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        return names.get(value, value)

    return click.Option(
        ["-o", "--output"],
        type=click.Choice([*FORMATS, *names]),
        default="table",
        callback=canonical,
        help="table (for people), json or yaml (a stable structure for scripts, times in "
        "ISO 8601 UTC)",
    )


def iso(ts: float | None) -> str | None:
    """A unix time as ISO 8601 UTC to the second, ``2025-01-31T12:00:00Z`` (``None`` stays)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dumps(fmt: str, document: Any, *, compact: bool = False) -> str:
    """``document`` as JSON (indented, or on one line with ``compact``) or YAML text."""
    if fmt == "json":
        if compact:
            return json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return text


def emit(args: Args, document: Any, table: Callable[[], None]) -> None:
    """Print ``document`` in the format of ``args.output``; for ``table``, call ``table``.

    Args:
        args: the parsed options (``output`` from ``add_output_option``).
        document: plain data (dicts, lists, strings, numbers, ``None``).
        table: prints the human form.
    """
    if args.output == "table":
        table()
        return
    sys.stdout.write(dumps(args.output, document))
    sys.stdout.flush()


def emit_item(args: Args, document: Any) -> None:
    """Print one item of a stream: a JSON line, or a YAML document opened by ``---``."""
    if args.output == "json":
        sys.stdout.write(dumps("json", document, compact=True))
    else:
        sys.stdout.write("---\n" + dumps("yaml", document))
    sys.stdout.flush()
