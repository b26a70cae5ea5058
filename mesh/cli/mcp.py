"""``mesh-agent mcp`` and ``mesh-agent mcp-wrap``: the MCP bridges (``mesh.bridges.mcp_serve``,
``mesh.bridges.mcp_wrap``; ``docs/mcp.md``) from the command line.

- ``mcp``: serve chosen mesh endpoints as MCP tools, over stdio (the default: for desktop LLM
  clients; nothing but MCP is written on stdout, logs go to stderr) or streamable HTTP
  (``--http HOST:PORT``). The bridge calls with its own identity (``--identity``), on behalf of
  ``--principal`` when given (its certificate needs the role ``gateway``).
- ``mcp-wrap NAME``: connect to an MCP server (``--command`` over stdio, ``--url`` over
  streamable HTTP) and serve its tools as the endpoints of the mesh agent ``NAME``, with
  the options of ``mesh-agent run`` (identity, enrolment, policy, access log, metrics).

The ``mcp`` SDK is an optional extra (``pip install 'natsmesh[mcp]'``): it is imported only
when one of these commands runs. This module imports ``mesh.cli.agent`` only inside functions:
``agent`` registers these commands, and shares its options and runner with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from mesh._log import get_logger
from mesh.errors import FailedPrecondition, InvalidArgument

from ._common import DURATION, Args, argument, command, configure_logging, option

if TYPE_CHECKING:
    from mesh._connect import Mesh
    from mesh._core.config import MeshConfig
    from mesh.bridges.mcp_serve import McpBridge

__all__ = ["MCP_MISSING", "mcp_commands", "parse_http"]

log = get_logger("mesh.cli.mcp")

MCP_MISSING = "the MCP bridge needs the mcp SDK: pip install 'natsmesh[mcp]'"
DEFAULT_PATH = "/mcp"

# The options of `mesh-agent run` each command takes, by parameter name (their help, defaults
# and MESH_* variables stay defined once, in mesh.cli.agent).
_MCP_RUN_OPTIONS = (
    "servers", "identity", "root", "prefix", "replicas", "drain", "connect_timeout",
    "log_level", "log_format", "traces", "allow_no_policy", "pin",
)  # fmt: skip
_WRAP_RUN_OPTIONS = (
    "servers", "identity", "root", "token", "enrol_timeout", "prefix", "replicas", "drain",
    "connect_timeout", "log_level", "log_format", "traces", "metrics_port", "metrics_addr",
    "access_log", "allow_no_policy", "delegate", "pin",
)  # fmt: skip


def _sdk(module: str) -> ModuleType:
    """Import a bridge module, which imports the ``mcp`` SDK.

    Raises:
        FailedPrecondition: the SDK is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.partition(".")[0] in ("mcp", "mcp_types"):
            raise FailedPrecondition(MCP_MISSING) from None
        raise


@contextlib.contextmanager
def _lone_errors() -> Iterator[None]:
    """The SDK's transports run on anyio task groups, which wrap what their body raised in an
    exception group: a lone error is raised as itself, so that the CLI prints
    ``ErrorType: message`` for a ``MeshError`` (and never a traceback)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []

        def walk(g: BaseExceptionGroup[BaseException]) -> None:
            for e in g.exceptions:
                if isinstance(e, BaseExceptionGroup):
                    walk(e)
                else:
                    leaves.append(e)

        walk(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6; ``:8000`` is ``127.0.0.1:8000``).

    Raises:
        InvalidArgument: not of that form.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"--http takes HOST:PORT, e.g. 127.0.0.1:8000, not {text!r}")
    return host, int(port)


def _config(args: Args) -> MeshConfig:
    from mesh._core.config import MeshConfig, Timeouts

    if not args.identity:
        raise InvalidArgument("no identity: pass --identity DIR or set MESH_IDENTITY")
    return MeshConfig(
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        prefix=args.prefix,
        timeouts=Timeouts(drain=args.drain, connect=args.connect_timeout),
        access_log=getattr(args, "access_log", False),
        state_dir=args.identity,
        allow_no_policy=args.allow_no_policy,
        replicas=int(args.replicas) if args.replicas is not None else None,
        delegation=getattr(args, "delegate", False),
        schema_pins=args.pin,
    )


def _root_public_key(args: Args) -> bytes | None:
    from mesh._core.identity import load_trust_root

    return load_trust_root(args.root).public_key if args.root else None


# --- mesh-agent mcp ----------------------------------------------------------------------------


def cmd_mcp(args: Args) -> int:
    """Serve mesh endpoints as MCP tools over stdio or streamable HTTP."""
    configure_logging(args.log_level, args.log_format)  # to stderr: stdout is MCP's
    serve = _sdk("mesh.bridges.mcp_serve")
    selection = serve.parse_selection([args.tools or ""], [args.agents or ""])
    config = _config(args)
    from mesh._core.identity import load_identity
    from mesh._observability.tracing import install_tracing

    identity = load_identity(args.identity, root_public_key=_root_public_key(args))
    if args.principal and "gateway" not in identity.certificate.roles:
        raise InvalidArgument(
            f"--principal {args.principal} needs an identity with the role gateway; "
            f"{identity.agent}'s certificate has {list(identity.certificate.roles) or 'none'}"
        )
    install_tracing(args.traces, identity.agent, identity.instance)
    http = parse_http(args.http) if args.http else None
    if http is not None and not args.path.startswith("/"):
        raise InvalidArgument(f"--path must start with '/', not {args.path!r}")

    from mesh._connect import Mesh

    def bridge(mesh: Mesh) -> McpBridge:
        b: McpBridge = serve.McpBridge(
            mesh,
            selection,
            principal=args.principal or None,
            timeout=args.timeout,
            version=_version(),
        )
        return b

    async def main() -> int:
        mesh = Mesh(identity, config)  # inside the loop it runs on
        if http is None:
            return await _serve_stdio(mesh, bridge)
        return await _serve_http(mesh, bridge, *http, args.path)

    with _lone_errors():
        return asyncio.run(main())


def _version() -> str:
    from mesh import __version__

    return __version__


async def _serve_stdio(mesh: Mesh, make: Callable[[Mesh], McpBridge]) -> int:
    """Claim stdin and stdout for MCP first (the SDK points fd 1 at stderr meanwhile, so
    nothing else can write on the wire), then start the mesh and serve until the client
    closes stdin, or a signal."""
    from mcp.server.stdio import stdio_server

    from .agent import StopSignals, _Interrupted

    with StopSignals() as stop:
        async with stdio_server() as (read, write):
            try:
                await stop.unless(mesh.start(), "starting")
            except _Interrupted as exc:
                return 128 + exc.signum
            bridge: McpBridge = make(mesh)
            log.info("mcp.ready", transport="stdio", agent=mesh.name, instance=mesh.instance)
            try:
                await stop.unless(bridge.run(read, write), "serving")
            except _Interrupted:
                pass  # a signal while serving is a normal stop
            finally:
                await mesh.drain()
                log.info("mcp.stopped", agent=mesh.name)
    return 0


async def _serve_http(
    mesh: Mesh, make: Callable[[Mesh], McpBridge], host: str, port: int, path: str
) -> int:
    """Start the mesh, then the streamable HTTP app on uvicorn until a signal."""
    from mesh.bridges.mcp_serve import mcp_asgi_app
    from mesh.bridges.serving import serving

    from .agent import StopSignals, _Interrupted

    with StopSignals() as stop:
        try:
            await stop.unless(mesh.start(), "starting")
        except _Interrupted as exc:
            return 128 + exc.signum
        try:
            app = mcp_asgi_app(make(mesh), path=path, host=host)
            # lifespan on: it runs the SDK's session manager.
            async with serving(
                app, host, port, what="the MCP server", missing=MCP_MISSING, lifespan="on"
            ) as (url, task):
                log.info("mcp.ready", transport="http", url=url + path, agent=mesh.name)
                with contextlib.suppress(_Interrupted):
                    await stop.unless(asyncio.shield(task), "serving")
        finally:
            await mesh.drain()
            log.info("mcp.stopped", agent=mesh.name)
    return 0


# --- mesh-agent mcp-wrap ----------------------------------------------------------------------


def cmd_mcp_wrap(args: Args) -> int:
    """Serve an MCP server's tools as the endpoints of the mesh agent NAME."""
    configure_logging(args.log_level, args.log_format)
    wrap = _sdk("mesh.bridges.mcp_wrap")
    from mesh._core.identity import load_identity
    from mesh._core.names import validate_name
    from mesh._observability.metrics import serve_prometheus
    from mesh._observability.tracing import install_tracing

    validate_name("agent", args.name)
    spec = wrap.McpServerSpec(
        command=args.command or None,
        url=args.url or None,
        cwd=Path(args.cwd) if args.cwd else None,
    )
    config = _config(args)
    root_pk = _root_public_key(args)
    instance: str | None = None
    with contextlib.suppress(InvalidArgument):
        instance = load_identity(args.identity, root_public_key=root_pk).instance
    install_tracing(args.traces, args.name, instance)
    if args.metrics_port:
        serve_prometheus(
            int(args.metrics_port), args.metrics_addr, service_name=args.name, instance=instance
        )
    with _lone_errors():
        return asyncio.run(_wrap(args, wrap, spec, config, root_pk))


async def _wrap(args: Args, wrap: Any, spec: Any, config: MeshConfig, root_pk: bytes | None) -> int:
    from .agent import run_agent

    # Ctrl-C before the agent runs (while the server starts) ends the command like any other.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        async with wrap.mcp_session(spec, timeout=config.timeouts.connect) as session:
            tools = await wrap.list_all_tools(session, timeout=config.timeouts.connect)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            info = session.server_info
            labels = {"mcp-server": info.name[:63]} if info is not None and info.name else {}
            agent = wrap.wrap_tools(args.name, session, tools, version=args.version, labels=labels)
            log.info(
                "mcp_wrap.tools",
                agent=args.name,
                server=spec.describe(),
                endpoints=sorted(agent.endpoints),
            )
            code: int = await run_agent(
                agent,
                config,
                identity_dir=Path(args.identity),
                token=args.token,
                root_public_key=root_pk,
                root_key=None,
                enrol_timeout=args.enrol_timeout,
            )
            return code
    except asyncio.CancelledError:
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


# --- registration ------------------------------------------------------------------------------


def _picked(names: tuple[str, ...]) -> list[click.Parameter]:
    from .agent import run_options

    return run_options(*names)


def mcp_commands() -> list[click.Command]:
    """The commands ``mesh-agent`` registers: ``mcp`` and ``mcp-wrap``."""
    serve_params: list[click.Parameter] = [
        option(
            "--tools",
            env="MCP_TOOLS",
            metavar="AGENT.ENDPOINT,...",
            help="the mesh endpoints to serve as tools (named AGENT.ENDPOINT), comma-separated",
        ),
        option(
            "--agents",
            env="MCP_AGENTS",
            metavar="AGENT,...",
            help="serve every endpoint of these agents as tools, comma-separated",
        ),
        option(
            "--http",
            env="MCP_HTTP",
            metavar="HOST:PORT",
            help="serve streamable HTTP on HOST:PORT instead of stdio (no authentication of "
            "its own: keep it on 127.0.0.1, or mount it in the gateway)",
        ),
        option(
            "--path",
            default=DEFAULT_PATH,
            env="MCP_PATH",
            help="the URL path of the streamable HTTP endpoint (with --http)",
        ),
        option(
            "--principal",
            env="MCP_PRINCIPAL",
            metavar="KIND:NAME",
            help="make every call on behalf of this external principal (e.g. user:alice), as "
            "the delegation chain's origin; the identity needs the role gateway",
        ),
        option(
            "--timeout",
            type=DURATION,
            env="MCP_TIMEOUT",
            help="bound on each mesh call [default: the policy's, else the mesh's default]",
        ),
        *_picked(_MCP_RUN_OPTIONS),
    ]
    wrap_params: list[click.Parameter] = [
        argument("name"),
        option(
            "--command",
            env="MCP_COMMAND",
            help='run the MCP server as this command and talk stdio to it (e.g. "python '
            'server.py"; split as a POSIX shell does)',
        ),
        option(
            "--url",
            env="MCP_URL",
            help="talk to the MCP server at this streamable HTTP URL (e.g. "
            "http://127.0.0.1:8000/mcp)",
        ),
        option(
            "--cwd",
            env="MCP_CWD",
            help="the working directory of --command [default: the current one]",
        ),
        option(
            "--agent-version",
            "version",
            default="0.0.0",
            env="MCP_AGENT_VERSION",
            help="the version the wrapping agent announces",
        ),
        *_picked(_WRAP_RUN_OPTIONS),
    ]
    return [
        command(
            "mcp",
            cmd_mcp,
            "serve mesh endpoints as MCP tools (stdio by default, for desktop LLM clients; "
            "--http for streamable HTTP)",
            serve_params,
        ),
        command(
            "mcp-wrap",
            cmd_mcp_wrap,
            "serve the tools of an MCP server (--command or --url) as the endpoints of the "
            "mesh agent NAME",
            wrap_params,
        ),
    ]
