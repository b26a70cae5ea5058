"""``mesh-policy schemas AGENT``: an agent's published endpoint schemas, verified against its
signed directory record (``Mesh.schemas``), with the hashes a caller pins."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from mesh import EndpointSchema

from ._admin import admin_mesh, online_command, out
from ._common import DURATION, Args, argument, option
from ._output import emit, output_option


def schemas_document(agent: str, schemas: dict[str, EndpointSchema]) -> dict[str, Any]:
    """``schemas -o json``: ``{agent, endpoints: {name: {hash, streams, idempotent, input,
    output}}}``, endpoints sorted by name."""
    endpoints = {}
    for name in sorted(schemas):
        doc = schemas[name].document()
        del doc["name"]
        endpoints[name] = doc
    return {"agent": agent, "endpoints": endpoints}


def _title(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "-"
    return str(schema.get("title") or schema.get("type") or "schema")


async def cmd_schemas(args: Args) -> int:
    """Print AGENT's endpoint schemas, checked against the hashes in its signed record."""
    async with admin_mesh(args) as mesh:
        schemas = await mesh.schemas(args.agent, timeout=args.timeout)
    if args.json:
        args.output = "json"

    def show() -> None:
        table = Table("endpoint", "input", "output", "streams", "idempotent", "schema hash")
        for name in sorted(schemas):
            s = schemas[name]
            table.add_row(
                name,
                escape(_title(s.input)),
                escape(_title(s.output)),
                "yes" if s.streams else "no",
                "yes" if s.idempotent else "no",
                s.hash or "[yellow]not published[/]",
            )
        out.print(table)
        out.print(
            f"Verified against {args.agent}'s signed directory record. The schemas: "
            f"mesh-policy schemas {args.agent} --json; pin one: mesh-agent run --pin "
            f"{args.agent}.ENDPOINT=HASH",
            markup=False,
        )

    emit(args, schemas_document(args.agent, schemas), show)
    return 0


def schemas_command() -> click.Command:
    """The ``schemas`` command of ``mesh-policy``."""
    return online_command(
        "schemas",
        cmd_schemas,
        "print AGENT's endpoint input and output JSON Schemas and their hashes, verified "
        "against its signed directory record",
        [
            argument("agent"),
            output_option(),
            option("--json", is_flag=True, help="same as -o json"),
            option(
                "--timeout",
                type=DURATION,
                default="10s",
                help="bound on finding an instance and fetching its schemas",
            ),
        ],
    )
