"""``mesh-policy audit``: read, follow and verify the hash-chained audit log."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mesh.control_plane import AuditRecord, verify_audit_chain

from ._admin import add_command, admin_mesh, err, online, out, when

if TYPE_CHECKING:
    from ._admin import Subcommands


def _audit_line(rec: AuditRecord) -> str:
    details = " ".join(f"{k}={v}" for k, v in rec.details.items() if v not in (None, [], ""))
    return f"{rec.seq:>6} {when(rec.ts)} {rec.kind:<26} {rec.actor:<28} {rec.subject} {details}"


async def cmd_audit_tail(args: argparse.Namespace) -> int:
    """Print the last records; with -f, follow new ones (each verified)."""
    async with admin_mesh(args) as mesh:
        records, problems = await mesh.control.read_audit(mesh.governance.head)
        for rec in records[-args.lines :] if args.lines > 0 else []:
            out.print(_audit_line(rec), markup=False)
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
                out.print(_audit_line(recs[-1]), markup=False)
    return 0


async def cmd_audit_verify(args: argparse.Namespace) -> int:
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


def add_parser(sub: Subcommands, conn: argparse.ArgumentParser) -> None:
    """The ``audit`` command group; ``conn`` holds the connection options."""
    audit = sub.add_parser(
        "audit",
        help="read the audit log",
        description="Read and verify the hash-chained audit log.",
    )
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    tail = add_command(asub, "tail", online(cmd_audit_tail), "print the last audit records", conn)
    tail.add_argument("-n", "--lines", type=int, default=20)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    add_command(
        asub,
        "verify",
        online(cmd_audit_verify),
        "verify every signature and the hash chain; exit 1 on a problem",
        conn,
    )
