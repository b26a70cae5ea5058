"""``mesh-policy audit``: read, follow and verify the hash-chained audit log."""

from __future__ import annotations

from typing import Any

import click

from mesh.control_plane import AuditRecord, verify_audit_chain

from ._admin import admin_mesh, err, online_command, out, when
from ._common import Args, group, option
from ._output import emit, emit_item, iso, output_option

# Keys of a record's details that hold unix times (tokens' ``expires_at``, certificates'
# ``not_after``): ISO 8601 in json and yaml, as every other time.
_TIME_KEYS = ("not_after", "not_before")


def _audit_line(rec: AuditRecord) -> str:
    details = " ".join(f"{k}={v}" for k, v in rec.details.items() if v not in (None, [], ""))
    return f"{rec.seq:>6} {when(rec.ts)} {rec.kind:<26} {rec.actor:<28} {rec.subject} {details}"


def _is_time(key: str, value: object) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and (key.endswith("_at") or key in _TIME_KEYS)


def audit_document(rec: AuditRecord) -> dict[str, Any]:
    """A record for ``-o json|yaml``: ``seq``, ``ts``, ``kind``, ``actor``, ``subject``,
    ``details`` (times in them as ISO 8601 too) and ``prev`` (the previous record's SHA-256)."""
    return {
        "seq": rec.seq,
        "ts": iso(rec.ts),
        "kind": rec.kind,
        "actor": rec.actor,
        "subject": rec.subject,
        "details": {k: iso(v) if _is_time(k, v) else v for k, v in rec.details.items()},
        "prev": rec.prev,
    }


async def cmd_audit_tail(args: Args) -> int:
    """Print the last records; with -f, follow new ones (each verified)."""

    def show(recs: list[AuditRecord]) -> None:
        for rec in recs:
            out.print(_audit_line(rec), markup=False)

    async with admin_mesh(args) as mesh:
        records, problems = await mesh.control.read_audit(mesh.governance.head)
        last_n = records[-args.lines :] if args.lines > 0 else []
        if not args.follow:
            emit(args, [audit_document(r) for r in last_n], lambda: show(last_n))
        elif args.output == "table":
            show(last_n)
        else:  # a stream: one document per record
            for rec in last_n:
                emit_item(args, audit_document(rec))
        for p in problems:
            err.print(f"[red]audit problem:[/] {p}")
        if not args.follow:
            return 1 if problems else 0
        stream = await mesh.control.audit_stream()
        last = await stream.last()
        tail: list[tuple[int, bytes]] = [last] if last else []
        async for seq, raw in stream.follow((last[0] + 1) if last else 1):
            tail = [*tail[-1:], (seq, raw)]
            recs, probs = verify_audit_chain(tail, mesh.trust_root.public_key, first_seq=tail[0][0])
            for p in probs:
                err.print(f"[red]audit problem:[/] {p}")
            if recs and recs[-1].seq == seq:
                if args.output == "table":
                    show(recs[-1:])
                else:
                    emit_item(args, audit_document(recs[-1]))
    return 0


async def cmd_audit_verify(args: Args) -> int:
    """Check every signature and link; exit 1 on any problem."""
    async with admin_mesh(args) as mesh:
        records, problems = await mesh.control.read_audit(mesh.governance.head)
    for p in problems:
        out.print(f"FAIL {p}", markup=False)
    if problems:
        out.print(f"audit log: {len(problems)} problem(s) in {len(records)} verified record(s)")
        return 1
    out.print(f"audit log OK: {len(records)} records, signatures and hash chain verified")
    return 0


def commands() -> click.Group:
    """The ``audit`` command group."""
    return group(
        "audit",
        "read and verify the hash-chained audit log",
        [
            online_command(
                "tail",
                cmd_audit_tail,
                "print the last audit records",
                [
                    option(
                        "-n",
                        "--lines",
                        type=click.IntRange(min=0),
                        default=20,
                        help="how many of the last records",
                    ),
                    option(
                        "-f",
                        "--follow",
                        is_flag=True,
                        help="keep printing new records (with -o json one JSON object a line, "
                        "with -o yaml one YAML document each)",
                    ),
                    output_option(),
                ],
            ),
            online_command(
                "verify",
                cmd_audit_verify,
                "verify every signature and the hash chain; exit 1 on a problem",
            ),
        ],
    )
