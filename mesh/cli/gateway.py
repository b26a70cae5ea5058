"""``mesh-agent gateway``: serve mesh endpoints over HTTP/JSON (``mesh.bridges.http``).

The gateway is a mesh client with an identity of its own, whose certificate must hold the
role ``gateway``: it calls each endpoint on behalf of the principal of the API key presented
(``mesh-policy gateway-key issue``). Its identity comes like an agent's: issued offline
(``mesh-policy identity issue gateway --roles gateway --root keys --out keys/gateway``) or
enrolled with a join token (``mesh-policy identity token gateway --roles gateway``, then
``--token``). It needs the ``web`` extra (``pip install 'natsmesh[web]'``: Starlette and
uvicorn). SIGINT or SIGTERM stops it: the server stops accepting, gives the calls in flight
2 s and cancels the rest, the mesh connection drains; exit 0 (128 + the signal before it
served).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path
from typing import Any

import click

from mesh._connect import Mesh
from mesh._core.config import DirectoryConfig, MeshConfig, Timeouts
from mesh._core.identity import IDENTITY_KEY_FILE, load_identity, load_trust_root, save_identity
from mesh._log import get_logger
from mesh._observability.tracing import install_tracing
from mesh.errors import FailedPrecondition, InvalidArgument

from ._common import DURATION, Args, command, configure_logging, option

log = get_logger("mesh.cli.gateway")

DEFAULT_LISTEN = "127.0.0.1:8480"
WEB_MISSING = "mesh-agent gateway needs starlette and uvicorn: pip install 'natsmesh[web]'"
_SIZE = re.compile(r"\s*(\d+)\s*(b|kib|mib|kb|mb)?\s*", re.I)
_UNITS = {None: 1, "b": 1, "kib": 1024, "mib": 1024 * 1024, "kb": 1000, "mb": 1000 * 1000}


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    """A size: ``1048576``, ``512KiB``, ``1MiB`` (also ``kB``, ``MB``): bytes as an int."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        m = _SIZE.fullmatch(str(value))
        if not m or int(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a size, e.g. 1MiB, 512KiB or 65536", param, ctx)
        unit = m.group(2).lower() if m.group(2) else None
        return int(m.group(1)) * _UNITS[unit]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8480`` for IPv6, ``:8480`` for 127.0.0.1).

    Raises:
        InvalidArgument: not of that form.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"--listen takes HOST:PORT, e.g. {DEFAULT_LISTEN}, not {text!r}")
    return host, int(port)


def _agents(text: str | None) -> tuple[str, ...] | None:
    names = tuple(a.strip() for a in (text or "").split(",") if a.strip())
    return names or None


def cmd_gateway(args: Args) -> int:
    """Serve the mesh over HTTP until SIGINT or SIGTERM."""
    configure_logging(args.log_level, args.log_format)
    try:
        import starlette  # noqa: F401  (fail before connecting)
        import uvicorn  # noqa: F401
    except ImportError:
        raise FailedPrecondition(WEB_MISSING) from None
    from mesh.bridges.http import GatewaySettings

    if not args.identity:
        raise InvalidArgument("no identity: pass --identity DIR or set MESH_IDENTITY")
    host, port = parse_listen(args.listen)
    agents = _agents(args.agents)
    config = MeshConfig(
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        prefix=args.prefix,
        timeouts=Timeouts(connect=args.connect_timeout),
        state_dir=args.identity,  # the newest signed head seen: a restart refuses older ones
        directory=DirectoryConfig(scope="all") if agents is None else DirectoryConfig(),
        caller_checks=False,  # callees decide, so they audit every refusal of a principal
        allow_no_policy=False,  # fail closed, as mesh-agent run: no signed head, no start
    )
    settings = GatewaySettings(
        agents=agents,
        max_body=args.max_body,
        max_timeout=args.max_timeout,
        access_log=args.access_log,
        allow_stale_keys=args.allow_stale_keys,
    )
    root_pk = load_trust_root(args.root).public_key if args.root else None
    instance = None
    with contextlib.suppress(InvalidArgument):
        instance = load_identity(args.identity, root_public_key=root_pk).instance
    install_tracing(args.traces, "gateway", instance)
    return asyncio.run(
        run_gateway(
            config,
            settings,
            identity_dir=Path(args.identity),
            root_public_key=root_pk,
            token=args.token,
            listen=(host, port),
            name=args.name,
        )
    )


async def run_gateway(
    config: MeshConfig,
    settings: Any,
    *,
    identity_dir: Path,
    root_public_key: bytes | None,
    token: str | None,
    listen: tuple[str, int],
    name: str = "gateway",
) -> int:
    """Enrol if needed, connect, serve HTTP until a signal, then stop and drain.

    Returns:
        0 after a clean stop; 128 + the signal when it came before serving.
    """
    from mesh.bridges.http import Gateway, serve_gateway

    from .agent import StopSignals, _Interrupted, enrol_until, enrolment_keys

    with StopSignals() as stop:
        try:
            if token and not (identity_dir / IDENTITY_KEY_FILE).exists():
                if root_public_key is None:
                    raise InvalidArgument("enrolling with --token needs --root (root.pub)")
                identity = await enrol_until(
                    config,
                    stop,
                    agent=name,
                    token=token,
                    root_public_key=root_public_key,
                    keys=enrolment_keys(identity_dir),
                    bound=300.0,
                )
                save_identity(identity, identity_dir)
                (identity_dir / "enrolment.key").unlink(missing_ok=True)
            identity = load_identity(identity_dir, root_public_key=root_public_key)
            mesh = Mesh(identity, config)

            def keep(renewed: Any) -> None:  # renewed certificates survive restarts
                save_identity(renewed, identity_dir)

            mesh.certificate_listeners.append(keep)
            try:
                await stop.unless(mesh.start(), "starting")
                gateway = Gateway(mesh, settings)
                await stop.unless(gateway.start(config.timeouts.connect), "starting")
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(mesh.drain(), 2.0)
                raise
        except _Interrupted as exc:
            log.info("gateway.interrupted", phase=exc.phase, signal=signal.Signals(exc.signum).name)
            return 128 + exc.signum

        def announce(url: str) -> None:
            shown = ", ".join(settings.agents) if settings.agents else "every agent listed"
            log.info("gateway.ready", url=url, agents=shown, instance=mesh.instance)
            print(f"gateway: {url} serving {shown} (Ctrl-C to stop)", file=sys.stderr, flush=True)

        serving = asyncio.ensure_future(
            serve_gateway(gateway, listen[0], listen[1], started=announce)
        )
        stopping = asyncio.ensure_future(stop.event.wait())
        closed = asyncio.ensure_future(mesh.wait_closed())
        try:
            await asyncio.wait((serving, stopping, closed), return_when=asyncio.FIRST_COMPLETED)
            if serving.done() and not serving.cancelled():
                serving.result()  # what stopped it (the address is taken, ...)
            if closed.done() and not stopping.done():
                raise FailedPrecondition("the gateway stopped: its certificate was revoked")
        finally:
            for task in (serving, stopping, closed):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await gateway.close()
            log.info("gateway.stopped", instance=mesh.instance)
            await mesh.drain()
    return 0


def gateway_command() -> click.Command:
    """``mesh-agent gateway`` with its options."""
    from .agent import run_options  # agent.py registers this command: imported when called

    return command(
        "gateway",
        cmd_gateway,
        "serve mesh endpoints over HTTP/JSON: POST /v1/AGENT/ENDPOINT, with API keys, "
        "server-sent events and an OpenAPI document (docs/gateway.md)",
        [
            *run_options("servers"),
            option(
                "--identity",
                env="IDENTITY",
                help="the gateway's identity directory (its certificate holds the role gateway)",
            ),
            option(
                "--root", env="TRUST_ROOT", help="the trust root's public key: root.pub or its dir"
            ),
            option(
                "--token",
                env="JOIN_TOKEN",
                help="one-time join token (with --roles gateway): enrol into --identity first",
            ),
            option(
                "--name",
                default="gateway",
                env="GATEWAY_NAME",
                help="the agent name --token enrols as (the token's)",
            ),
            *run_options("prefix"),
            option(
                "--listen",
                default=DEFAULT_LISTEN,
                env="GATEWAY_LISTEN",
                help="HOST:PORT to serve HTTP on (port 0: a free one)",
            ),
            option(
                "--agents",
                env="GATEWAY_AGENTS",
                metavar="AGENT,...",
                help="the agents to expose [default: every agent the directory lists, but the "
                "registry]",
            ),
            option(
                "--max-body",
                default="1MiB",
                type=ByteSize(),
                env="GATEWAY_MAX_BODY",
                help="the largest request body; 413 beyond",
            ),
            option(
                "--max-timeout",
                default="60s",
                type=DURATION,
                env="GATEWAY_MAX_TIMEOUT",
                help="the longest a call may take: X-Mesh-Timeout is cut to it",
            ),
            option(
                "--allow-stale-keys",
                is_flag=True,
                env="GATEWAY_ALLOW_STALE_KEYS",
                help="accept keys while the signed head is expired (a revocation may be missed)",
            ),
            option(
                "--access-log/--no-access-log",
                default=True,
                env="GATEWAY_ACCESS_LOG",
                help="one JSON line per call on stdout (never a body)",
            ),
            option(
                "--connect-timeout",
                default="10s",
                type=DURATION,
                env="CONNECT_TIMEOUT",
                help="bound on reaching NATS and loading the directory, policy and keys",
            ),
            *run_options("traces", "log_level", "log_format"),
        ],
    )
