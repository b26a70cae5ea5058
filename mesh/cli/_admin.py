"""What the ``mesh-policy`` command groups share: the consoles, times, certificate warnings,
the admin connection and its options, and calls to the registry."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click
from pydantic import BaseModel
from rich.console import Console

from mesh import Certificate, DirectoryConfig, Mesh, MeshConfig, load_identity
from mesh.control_plane import REGISTRY

from ._common import Args, command, option

M = TypeVar("M", bound=BaseModel)

EXPIRY_WARNING_S = 7 * 24 * 3600
# Piped output keeps whole rows (serials, instance ids) so it can be cut and pasted.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def when(ts: float) -> str:
    """A timestamp as ``2025-01-31 12:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def warn_if_expiring(cert: Certificate, what: str) -> None:
    """Warn on stderr when a certificate is within a week (or 10 % of its life) of expiry."""
    left = cert.not_after - time.time()
    if left <= 0:
        err.print(f"[bold red]warning:[/] {what} certificate {cert.serial} has EXPIRED")
    elif left < min(EXPIRY_WARNING_S, (cert.not_after - cert.not_before) * 0.1) or left < 3600:
        err.print(
            f"[yellow]warning:[/] {what} certificate {cert.serial} expires in "
            f"{left / 3600:.1f} h ({when(cert.not_after)})"
        )


def _config(args: Args) -> MeshConfig:
    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    # An admin client serves nothing: it starts without a fresh head (the registry may be
    # down, which `audit verify` and `agents` must still show), keeping the newest head it
    # saw in its identity directory so it notices a rollback. It reports no golden signals:
    # the CLI's own calls are not the mesh's traffic (`top` and `graph` would show them).
    # It watches every agent: `agents`, `check` and the dashboard list the whole mesh.
    replicas = getattr(args, "replicas", None)
    return MeshConfig(
        servers=servers,
        prefix=args.prefix,
        allow_no_policy=True,
        state_dir=args.identity,
        replicas=int(replicas) if replicas is not None else None,
        signals_interval=0,
        directory=DirectoryConfig(scope="all"),
    )


@asynccontextmanager
async def admin_mesh(args: Args) -> AsyncIterator[Mesh]:
    """A mesh connection as the admin identity of ``--identity`` (no agent)."""
    identity = load_identity(args.identity)
    warn_if_expiring(identity.certificate, "your")
    async with Mesh(identity, _config(args)) as mesh:
        yield mesh


async def call_registry(mesh: Mesh, endpoint: str, body: BaseModel, reply: type[M]) -> M:
    """Call one of the registry agent's endpoints."""
    await mesh.wait_for(REGISTRY, timeout=5)
    return await mesh.request(REGISTRY, endpoint, body, reply, timeout=15)


def online(
    fn: Callable[[Args], Coroutine[Any, Any, int]],
) -> Callable[[Args], int]:
    """An async command as a command."""

    def run(args: Args) -> int:
        return asyncio.run(fn(args))

    run.__doc__ = fn.__doc__
    return run


def connection_options() -> list[click.Option]:
    """The options of every command that talks to the mesh."""
    return [
        option(
            "--servers",
            default="nats://127.0.0.1:4222",
            env="SERVERS",
            help="NATS URLs, comma-separated",
        ),
        option("--identity", default="keys/admin", env="IDENTITY", help="admin identity directory"),
        option("--prefix", default="mesh", env="PREFIX", help="subject prefix of the mesh"),
        option(
            "--replicas",
            type=click.IntRange(1, 5),
            env="REPLICAS",
            help="JetStream replicas of stores this command creates [default: 3 on a cluster "
            "of three or more servers, else 1]",
        ),
    ]


def online_command(
    name: str,
    fn: Callable[[Args], Coroutine[Any, Any, int]],
    help: str,
    params: list[click.Parameter] | None = None,
) -> click.Command:
    """A command that connects to the mesh: ``fn`` runs in an event loop, with the connection
    options after its own."""
    return command(name, online(fn), help, [*(params or []), *connection_options()])
