"""``mesh-agent``: run an agent from a module path (``run``), or the demo mesh (``demo``).

``run`` reads its settings from options or ``MESH_*`` environment variables:

=================  =====================  ==========================================
option             environment            meaning
=================  =====================  ==========================================
``--servers``      ``MESH_SERVERS``       comma-separated NATS URLs
``--identity``     ``MESH_IDENTITY``      identity directory (identity.key/.cert)
``--root``         ``MESH_TRUST_ROOT``    trust root public key file or directory
``--prefix``       ``MESH_PREFIX``        subject prefix (default ``mesh``)
``--token``        ``MESH_JOIN_TOKEN``    one-time join token: enrol, then save the
                                          identity into ``--identity``
``--root-key``     ``MESH_ROOT_KEY``      trust root private key (the registry only)
``--traces``       ``MESH_TRACES``        span exporter: none, console or otlp
``--metrics-port`` ``MESH_METRICS_PORT``  serve Prometheus metrics on this port
``--access-log``   ``MESH_ACCESS_LOG``    one JSON line per served request (1/true)
``--drain``        ``MESH_DRAIN_TIMEOUT`` bound on finishing in-flight work
``--log-level``    ``MESH_LOG_LEVEL``     debug, info, warning, error
=================  =====================  ==========================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import sys
from pathlib import Path

from mesh._connect import Mesh, enrol
from mesh._core.config import MeshConfig, Timeouts
from mesh._core.identity import (
    IDENTITY_KEY_FILE,
    Identity,
    load_identity,
    load_trust_root,
    save_identity,
)
from mesh._log import get_logger
from mesh._observability.metrics import serve_prometheus
from mesh._observability.tracing import install_tracing
from mesh._runtime.agent import Agent
from mesh.errors import FailedPrecondition, InvalidArgument

from ._common import add_version, configure_logging, env_default, parse_duration, run_command

log = get_logger(__name__)


def load_agent(spec: str) -> Agent:
    """Import ``module:attr`` and return the ``Agent`` it names.

    Raises:
        InvalidArgument: the module or attribute is missing, or is not an ``Agent``.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgument(f"{spec!r}: expected MODULE:ATTR, e.g. examples.research:planner")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import module {module_name!r}: {exc}") from exc
    agent = getattr(module, attr, None)
    if not isinstance(agent, Agent):
        raise InvalidArgument(f"{spec!r} is {type(agent).__name__}, not a mesh.Agent")
    return agent


async def serve(agent: Agent, mesh: Mesh) -> None:
    """Serve until SIGTERM or SIGINT, then drain (deregister, finish in-flight work, close).

    Raises:
        FailedPrecondition: the agent drained by itself (its certificate was revoked).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await mesh.start()
    log.info(
        "agent.ready",
        agent=agent.name,
        instance=mesh.instance,
        version=agent.version,
        endpoints=sorted(agent.endpoints),
        servers=list(mesh.config.servers),
    )
    stopping = asyncio.ensure_future(stop.wait())
    closed = asyncio.ensure_future(mesh.wait_closed())
    try:
        await asyncio.wait((stopping, closed), return_when=asyncio.FIRST_COMPLETED)
        if closed.done() and not stopping.done():
            # It drained by itself: its certificate was revoked.
            raise FailedPrecondition(f"agent {agent.name} stopped: its certificate was revoked")
    finally:
        for waiter in (stopping, closed):
            waiter.cancel()
        log.info("agent.draining", agent=agent.name, instance=mesh.instance)
        await mesh.drain()
        log.info("agent.stopped", agent=agent.name, instance=mesh.instance)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one agent instance."""
    configure_logging(args.log_level, args.log_format)
    agent = load_agent(args.target)
    if not args.identity:
        raise InvalidArgument("no identity: pass --identity DIR or set MESH_IDENTITY")
    config = MeshConfig(
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        prefix=args.prefix,
        timeouts=Timeouts(drain=parse_duration(args.drain)),
        access_log=args.access_log,
        state_dir=args.identity,  # the newest signed head and policy seen, kept across restarts
        allow_no_policy=args.allow_no_policy,
    )
    install_tracing(args.traces, agent.name)
    if args.metrics_port:
        serve_prometheus(int(args.metrics_port))
    root_key = load_trust_root(args.root_key) if args.root_key else None
    if root_key is not None and not root_key.can_sign:
        raise InvalidArgument(f"{args.root_key}: --root-key needs root.key, not root.pub")
    root_pk = load_trust_root(args.root).public_key if args.root else None
    root_pk = root_pk or (root_key.public_key if root_key else None)
    identity_dir = Path(args.identity)
    if args.token and not (identity_dir / IDENTITY_KEY_FILE).exists():
        if root_pk is None:
            raise InvalidArgument("enrolling with --token needs --root (the trust root's root.pub)")
        identity = asyncio.run(
            enrol(config, agent=agent.name, token=args.token, root_public_key=root_pk)
        )
        save_identity(identity, identity_dir)
        log.info("agent.enrolled", agent=agent.name, serial=identity.certificate.serial)
    identity = load_identity(identity_dir, root_public_key=root_pk)
    mesh = Mesh(identity, config, agent=agent, trust_root=root_key)

    # Keep renewed certificates across restarts.
    def keep(renewed: Identity) -> None:
        save_identity(renewed, identity_dir)

    mesh.certificate_listeners.append(keep)
    asyncio.run(serve(agent, mesh))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo mesh on an embedded NATS server."""
    from .demo import run_demo

    configure_logging("warning")
    return asyncio.run(run_demo(keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    """The ``mesh-agent`` argument parser."""
    p = argparse.ArgumentParser(prog="mesh-agent", description="Run mesh agents.")
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an agent defined in MODULE:ATTR")
    run.add_argument("target", help="MODULE:ATTR of a mesh.Agent, e.g. examples.research:planner")
    run.add_argument("--servers", default=env_default("SERVERS", "nats://127.0.0.1:4222"))
    run.add_argument("--identity", default=env_default("IDENTITY"))
    run.add_argument("--root", default=env_default("TRUST_ROOT"))
    run.add_argument("--token", default=env_default("JOIN_TOKEN"))
    run.add_argument("--root-key", default=env_default("ROOT_KEY"))
    run.add_argument("--prefix", default=env_default("PREFIX", "mesh"))
    run.add_argument("--drain", default=env_default("DRAIN_TIMEOUT", "10s"))
    run.add_argument("--log-level", default=env_default("LOG_LEVEL", "info"))
    run.add_argument(
        "--traces", choices=["none", "console", "otlp"], default=env_default("TRACES", "none")
    )
    run.add_argument("--metrics-port", type=int, default=env_default("METRICS_PORT"))
    run.add_argument(
        "--access-log",
        action="store_true",
        default=(env_default("ACCESS_LOG", "") or "").lower() in ("1", "true", "yes"),
    )
    run.add_argument("--log-format", choices=["console", "json"], default="console")
    run.add_argument(
        "--allow-no-policy",
        action="store_true",
        default=(env_default("ALLOW_NO_POLICY", "") or "").lower() in ("1", "true", "yes"),
        help="development mode: start with no policy when the mesh has no registry's head",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run a demo mesh on an embedded NATS server")
    demo.add_argument("--keep", action="store_true", help="stay up and print the NATS URL")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesh-agent``."""
    args = build_parser().parse_args(argv)
    return int(run_command(lambda: args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
