"""``mesh-agent``: run an agent from a module path or a file (``run``), the demo mesh (``demo``),
or the HTTP gateway (``gateway``, in ``mesh.cli.gateway``).

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
``--enrol-timeout`` ``MESH_ENROL_TIMEOUT`` how long to retry enrolment while no
                                          registry answers (default 5m)
``--root-key``     ``MESH_ROOT_KEY``      trust root private key (the registry only)
``--traces``       ``MESH_TRACES``        span exporter: none, console or otlp
``--metrics-port`` ``MESH_METRICS_PORT``  serve Prometheus metrics on this port
``--metrics-addr`` ``MESH_METRICS_ADDR``  the address it binds (default 0.0.0.0)
``--access-log``   ``MESH_ACCESS_LOG``    one JSON line per served request (1/true)
``--drain``        ``MESH_DRAIN_TIMEOUT`` bound on finishing in-flight work
``--replicas``     ``MESH_REPLICAS``      JetStream replicas of stores it creates
                                          (default: 3 on a cluster of 3+, else 1)
``--allow-no-policy`` ``MESH_ALLOW_NO_POLICY`` start with no policy when the mesh
                                          has no registry's head (development)
``--delegate``     ``MESH_DELEGATE``      start a delegation chain on every call this
                                          agent makes as an origin (docs/delegation.md)
``--pin``          ``MESH_SCHEMA_PINS``   AGENT.ENDPOINT=HASH, repeatable: refuse to call
                                          an endpoint whose schema hash is another
``--log-level``    ``MESH_LOG_LEVEL``     debug, info, warning, error
``--log-format``   ``MESH_LOG_FORMAT``    console or json
``--renewal-grace`` ``MESH_RENEWAL_GRACE`` the registry only: how long after expiry a
                                          certificate may still be renewed (default 7d)
=================  =====================  ==========================================

and ``--connect-timeout`` (``MESH_CONNECT_TIMEOUT``, 10 s): the bound on reaching NATS and
loading the directory and the policy at start, and on each enrolment attempt. The target is
``MODULE:ATTR`` or ``path/to/file.py:ATTR``. ``--reload`` (development) runs the agent under a
supervisor that restarts it when its sources change (``mesh.cli._reload``). SIGINT or SIGTERM
stops every phase at once: the exit code is 128 + the signal's number before the agent serves,
0 after a drain.

Enrolling with ``--token`` survives a registry that is not up yet: while an attempt fails as
unavailable (NATS unreachable, no registry listed, no answer), it is made again after a
backoff (a step of 1 s doubling to 30 s, with jitter), each failure logged as
``agent.enrol_retry``, until ``--enrol-timeout`` (``MESH_ENROL_TIMEOUT``, 5 min); a refusal
(unknown, used or expired token, a token for another agent) ends it at once. The keys are
made once and saved first (``enrolment.key``, 0600, in ``--identity``), so a retry, or a
restart after a crash, presents the same keys: a token that an attempt redeemed but whose reply
was lost is delivered again to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import random
import signal
import sys
import traceback
from collections.abc import Awaitable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import click

from mesh._connect import Mesh, enrol
from mesh._core.config import MeshConfig, Timeouts
from mesh._core.identity import (
    IDENTITY_KEY_FILE,
    Identity,
    InstanceKeys,
    TrustRoot,
    load_identity,
    load_keys,
    load_trust_root,
    save_identity,
    save_keys,
)
from mesh._log import get_logger
from mesh._observability.metrics import serve_prometheus
from mesh._observability.tracing import install_tracing
from mesh._runtime.agent import Agent
from mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

from ._common import (
    DURATION,
    Args,
    Duration,
    argument,
    command,
    completion_command,
    configure_logging,
    group,
    option,
    version_option,
)
from ._common import main as run_main
from .gateway import gateway_command
from .mcp import mcp_commands

log = get_logger("mesh.cli.agent")  # also when run as `python -m mesh.cli.agent`
T = TypeVar("T")


# Installed under other names (pyproject.toml): ``examples.research:planner`` works from any
# directory, not only from a clone's root.
_INSTALLED_AS = {"examples": "mesh_examples", "agents": "mesh_agents"}
_TARGET_HELP = "expected MODULE:ATTR or FILE.py:ATTR, e.g. examples.research:planner"
# The keys an enrolment presents, saved before its first attempt, until the identity is saved.
ENROLMENT_KEY_FILE = "enrolment.key"
ENROL_BACKOFF_BASE, ENROL_BACKOFF_CAP = 1.0, 30.0
# Failures that a later attempt may not see: the registry or NATS is not there (yet), or the
# registry is in trouble. Anything else (a refused token above all) is final.
_ENROL_RETRYABLE = (Unavailable, ResourceExhausted, Internal, DeadlineExceeded)


def _is_file_target(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _module_of_file(path: Path) -> tuple[Path, str]:
    """The folder to put on ``sys.path`` and the dotted name that ``path`` imports as: its
    enclosing packages (folders with ``__init__.py``) included, so relative imports work."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return folder, ".".join(parts)


def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as `python -m` and `python FILE` do


def _missing(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether the module ``name`` itself (or a package above it) is missing, rather than
    something that its code imports."""
    return exc.name is not None and (name == exc.name or name.startswith(exc.name + "."))


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an exception raised by a user's module, without the frames of the
    import machinery and of the mesh (the runner that imported it)."""
    internal = (
        str(Path(importlib.__file__).parent) + os.sep,
        str(Path(__file__).resolve().parents[1]) + os.sep,
    )

    def trim(te: traceback.TracebackException | None) -> None:
        while te is not None:
            te.stack = traceback.StackSummary.from_list(
                [f for f in te.stack if not f.filename.startswith(("<frozen ", *internal))]
            )
            trim(te.__cause__)
            te = te.__context__

    shown = traceback.TracebackException.from_exception(exc)
    trim(shown)
    return "".join(shown.format())


def _import(name: str, shown: str) -> ModuleType:
    """Import a user's module; a failure inside it prints its own traceback.

    Raises:
        InvalidArgument: the module is missing, or raised while being imported.
    """
    try:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top, _, rest = name.partition(".")
            if not _missing(exc, name) or top not in _INSTALLED_AS:
                raise
            installed = f"{_INSTALLED_AS[top]}.{rest}" if rest else _INSTALLED_AS[top]
            try:
                return importlib.import_module(installed)
            except ModuleNotFoundError as again:
                if not _missing(again, installed):
                    raise
                raise exc from None
    except ModuleNotFoundError as exc:
        if not _missing(exc, name):
            print(_user_traceback(exc), end="", file=sys.stderr)
            raise InvalidArgument(
                f"cannot import {shown}: {type(exc).__name__}: {exc} (traceback above)"
            ) from None
        raise InvalidArgument(
            f"cannot import module {name!r}: {exc} (run from the folder that holds it, or give "
            "its file: path/to/file.py:ATTR)"
        ) from None
    except Exception as exc:  # whatever the module's own code raised, SyntaxError included
        print(_user_traceback(exc), end="", file=sys.stderr)
        raise InvalidArgument(
            f"cannot import {shown}: {type(exc).__name__}: {exc} (traceback above)"
        ) from None


def load_agent(spec: str) -> Agent:
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return the ``Agent`` it names.

    A module path is looked up from the current directory first (as ``python -m`` does);
    ``examples.*`` and ``agents.*`` fall back to the installed ``mesh_examples`` and
    ``mesh_agents``. A file is imported under the dotted name its packages give it. When the
    module raises while it is imported, its traceback is printed to stderr, with only its own
    frames (not the runner's).

    Raises:
        InvalidArgument: the module or attribute is missing, is not an ``Agent``, or the
            module raised while it was imported.
    """
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise InvalidArgument(f"{spec!r}: {_TARGET_HELP}")
    if _is_file_target(module_name):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise InvalidArgument(f"{module_name}: no such file ({_TARGET_HELP})")
        folder, name = _module_of_file(path)
        _on_path(str(folder))
        module = _import(name, module_name)
        loaded = getattr(module, "__file__", None)
        if loaded is None or Path(loaded).resolve() != path:
            raise InvalidArgument(
                f"{module_name} imports as module {name!r}, but that name is taken by "
                f"{loaded or 'a built-in module'}: rename the file"
            )
    else:
        _on_path(os.getcwd())
        module = _import(module_name, repr(module_name))
    agent = getattr(module, attr, None)
    if not isinstance(agent, Agent):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Agent))
        problem = (
            f"{module_name} has no {attr!r}"
            if not hasattr(module, attr)
            else f"{spec!r} is {type(agent).__name__}, not a mesh.Agent"
        )
        raise InvalidArgument(problem + (f" (its agents: {', '.join(found)})" if found else ""))
    return agent


def watched_sources(spec: str) -> tuple[list[Path], list[Path]]:
    """What ``--reload`` watches for ``spec``, without importing it: ``(files, trees)``, the
    whole top-level package of the target's module, or the target's file and the ``*.py``
    files beside it when it is in no package."""
    module_name = spec.rpartition(":")[0]
    if _is_file_target(module_name):
        origin = Path(module_name).resolve()
        folder, name = _module_of_file(origin)
        if "." in name or origin.name == "__init__.py":
            return [origin], [folder / name.partition(".")[0]]
    else:
        _on_path(os.getcwd())
        top = module_name.partition(".")[0]
        found = importlib.util.find_spec(top) if top else None
        if found is None and top in _INSTALLED_AS:
            found = importlib.util.find_spec(_INSTALLED_AS[top])
        if found is not None and found.submodule_search_locations:
            return [], [Path(p) for p in found.submodule_search_locations]
        if found is None or found.origin is None or not Path(found.origin).is_file():
            return [], []  # the runner will say what is wrong with it
        origin = Path(found.origin)
    return sorted({origin, *origin.parent.glob("*.py")}), []


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived before the agent was serving."""

    def __init__(self, signum: int, phase: str) -> None:
        super().__init__(signum, phase)
        self.signum = signum
        self.phase = phase


class StopSignals:
    """SIGTERM and SIGINT as an event the runner watches in every phase (enrolling,
    connecting, loading the directory and the policy, serving), so that neither waits for a
    network timeout. Use as ``with StopSignals() as stop:`` inside the event loop."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopSignals:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                assert self._loop is not None
                self._loop.remove_signal_handler(sig)

    def _received(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    async def unless(self, work: Awaitable[T], phase: str) -> T:
        """``await work``, unless a signal arrives first: then cancel it.

        Raises:
            _Interrupted: a signal arrived first (``phase`` names what it interrupted).
        """
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self.event.wait())
        interrupted = False
        try:
            await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                interrupted = True
                task.cancel()
                await asyncio.wait((task,))
        if not interrupted:
            return task.result()
        if not task.cancelled():
            task.exception()  # what it raised while being cancelled: nobody waits for it
        assert self.signum is not None
        raise _Interrupted(self.signum, phase)


async def serve(agent: Agent, mesh: Mesh, stop: StopSignals) -> None:
    """Serve until SIGTERM or SIGINT, then drain (deregister, finish in-flight work, close).

    Raises:
        FailedPrecondition: the agent drained by itself (its certificate was revoked).
    """
    log.info(
        "agent.ready",
        agent=agent.name,
        instance=mesh.instance,
        version=agent.version,
        endpoints=sorted(agent.endpoints),
        servers=list(mesh.config.servers),
    )
    stopping = asyncio.ensure_future(stop.event.wait())
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


def enrolment_keys(identity_dir: Path) -> InstanceKeys:
    """The keys an enrolment into ``identity_dir`` presents: those an interrupted enrolment
    saved, else fresh ones, saved (0600) before anything is sent, so that a token redeemed
    for them whose reply was lost is delivered again, even after a restart.

    Raises:
        InvalidArgument: the saved keys are unreadable, or readable by group or others.
    """
    path = identity_dir / ENROLMENT_KEY_FILE
    try:
        return load_keys(path, "key file (delete it to start over)")
    except FileNotFoundError:
        keys = InstanceKeys.generate()
        identity_dir.mkdir(parents=True, exist_ok=True)
        save_keys(keys, path)
        return keys


def enrol_backoff(retry: int, rng: random.Random | None = None) -> float:
    """Seconds before enrolment retry number ``retry`` (1 for the first): a step of 1 s
    doubling up to 30 s, drawn from its upper half, so agents waiting for the same registry
    spread out without retrying at once."""
    step = min(ENROL_BACKOFF_CAP, ENROL_BACKOFF_BASE * 2.0 ** min(max(0, retry - 1), 64))
    return (rng or random).uniform(step / 2, step)


async def enrol_until(
    config: MeshConfig,
    stop: StopSignals,
    *,
    agent: str,
    token: str,
    root_public_key: bytes,
    keys: InstanceKeys,
    bound: float,
) -> Identity:
    """Enrol, trying again with backoff while the registry is unavailable, for ``bound``
    seconds; each attempt is bounded by ``config.timeouts.connect``.

    Raises:
        Unavailable: no attempt succeeded within ``bound`` (the last failure's reason).
        MeshError: a final refusal (``Unauthenticated`` for a refused token), at once.
        _Interrupted: a signal arrived.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    attempt = 0
    while True:
        attempt += 1
        left = deadline - loop.time()
        attempt_bound = max(0.1, min(config.timeouts.connect, left))
        enrolling = enrol(
            config,
            agent=agent,
            token=token,
            root_public_key=root_public_key,
            keys=keys,
            timeout=attempt_bound,
        )
        try:
            # The enrolment's own timeout does not cover reaching a server that never answers.
            return await stop.unless(asyncio.wait_for(enrolling, attempt_bound + 1.0), "enrolling")
        except _ENROL_RETRYABLE as exc:
            reason = f"{exc.code}: {exc.message}"
        except TimeoutError:
            reason = f"no answer within {attempt_bound:g}s"
        left = deadline - loop.time()
        if left <= 0.1:
            raise Unavailable(
                f"could not enrol {agent!r} within {bound:g}s (--enrol-timeout), {attempt} "
                f"attempts; the last: {reason}"
            )
        delay = min(enrol_backoff(attempt), left)
        log.warning(
            "agent.enrol_retry",
            agent=agent,
            attempt=attempt,
            reason=reason,
            retry_in=round(delay, 2),
            gives_up_in=round(left, 1),
        )
        await stop.unless(asyncio.sleep(delay), "enrolling")


async def run_agent(
    agent: Agent,
    config: MeshConfig,
    *,
    identity_dir: Path,
    token: str | None,
    root_public_key: bytes | None,
    root_key: TrustRoot | None,
    enrol_timeout: float = 300.0,
) -> int:
    """Enrol if needed (retrying for ``enrol_timeout`` seconds while no registry answers),
    start, serve, drain; a signal stops any phase at once.

    Returns:
        0 after a clean drain; 128 + the signal number when a signal came before serving.
    """
    with StopSignals() as stop:
        try:
            if token and not (identity_dir / IDENTITY_KEY_FILE).exists():
                if root_public_key is None:
                    raise InvalidArgument(
                        "enrolling with --token needs --root (the trust root's root.pub)"
                    )
                identity = await enrol_until(
                    config,
                    stop,
                    agent=agent.name,
                    token=token,
                    root_public_key=root_public_key,
                    keys=enrolment_keys(identity_dir),
                    bound=enrol_timeout,
                )
                save_identity(identity, identity_dir)
                (identity_dir / ENROLMENT_KEY_FILE).unlink(missing_ok=True)  # now identity.key
                log.info("agent.enrolled", agent=agent.name, serial=identity.certificate.serial)
            identity = load_identity(identity_dir, root_public_key=root_public_key)
            mesh = Mesh(identity, config, agent=agent, trust_root=root_key)

            def keep(renewed: Identity) -> None:  # renewed certificates survive restarts
                save_identity(renewed, identity_dir)

            mesh.certificate_listeners.append(keep)
            log.info("agent.starting", agent=agent.name, servers=list(config.servers))
            try:
                await stop.unless(mesh.start(), "starting")
            except _Interrupted:
                # Close what the start opened; briefly: nothing was served yet.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(mesh.drain(), min(config.timeouts.drain, 2.0))
                raise
            await serve(agent, mesh, stop)
            return 0
        except _Interrupted as exc:
            log.info(
                "agent.interrupted",
                agent=agent.name,
                phase=exc.phase,
                signal=signal.Signals(exc.signum).name,
            )
            return 128 + exc.signum


def cmd_run(args: Args) -> int:
    """Run one agent instance (under a reloading supervisor with ``--reload``)."""
    configure_logging(args.log_level, args.log_format)
    drain = args.drain
    if args.reload:
        from ._reload import supervise

        files, trees = watched_sources(args.target)
        main_call = "import sys; from mesh.cli.agent import main; sys.exit(main())"
        argv = click.get_current_context().find_root().obj["argv"]
        runner = [sys.executable, "-c", main_call, *argv, "--no-reload"]
        return supervise(runner, files=files, trees=trees, stop_timeout=drain + 5)
    agent = load_agent(args.target)
    if not args.identity:
        raise InvalidArgument("no identity: pass --identity DIR or set MESH_IDENTITY")
    config = MeshConfig(
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        prefix=args.prefix,
        timeouts=Timeouts(
            drain=drain, connect=args.connect_timeout, renewal_grace=args.renewal_grace
        ),
        access_log=args.access_log,
        state_dir=args.identity,  # the newest signed head and policy seen, kept across restarts
        allow_no_policy=args.allow_no_policy,
        replicas=int(args.replicas) if args.replicas is not None else None,
        delegation=args.delegate,
        schema_pins=args.pin,
    )
    root_key = load_trust_root(args.root_key) if args.root_key else None
    if root_key is not None and not root_key.can_sign:
        raise InvalidArgument(f"{args.root_key}: --root-key needs root.key, not root.pub")
    root_pk = load_trust_root(args.root).public_key if args.root else None
    root_pk = root_pk or (root_key.public_key if root_key else None)
    instance: str | None = None  # known once enrolled: names the OpenTelemetry resource
    with contextlib.suppress(InvalidArgument):
        instance = load_identity(args.identity, root_public_key=root_pk).instance
    install_tracing(args.traces, agent.name, instance)
    if args.metrics_port:
        serve_prometheus(
            int(args.metrics_port), args.metrics_addr, service_name=agent.name, instance=instance
        )
    running = run_agent(
        agent,
        config,
        identity_dir=Path(args.identity),
        token=args.token,
        root_public_key=root_pk,
        root_key=root_key,
        enrol_timeout=args.enrol_timeout,
    )
    return asyncio.run(running)


def cmd_demo(args: Args) -> int:
    """Run the demo mesh on an embedded NATS server."""
    from .demo import run_demo

    configure_logging("warning")
    return asyncio.run(run_demo(keep=args.keep, gateway=args.gateway))


def run_options(*names: str) -> list[click.Parameter]:
    """The options of ``run`` named (parameter names, e.g. ``log_level``), for the other
    commands that take them as ``run`` does (``gateway``, ``mcp``, ``mcp-wrap``)."""
    by_name = {p.name: p for p in _run_options()}
    return [by_name[n] for n in names]


def _run_options() -> list[click.Parameter]:
    return [
        argument("target"),
        option(
            "--servers",
            default="nats://127.0.0.1:4222",
            env="SERVERS",
            help="NATS URLs, comma-separated",
        ),
        option(
            "--identity", env="IDENTITY", help="identity directory (identity.key, identity.cert)"
        ),
        option(
            "--root",
            env="TRUST_ROOT",
            help="the trust root's public key: root.pub or its directory",
        ),
        option(
            "--token",
            env="JOIN_TOKEN",
            help="one-time join token: enrol, then save the identity into --identity",
        ),
        option(
            "--enrol-timeout",
            default="5m",
            type=DURATION,
            env="ENROL_TIMEOUT",
            help="how long --token enrolment retries while no registry answers",
        ),
        option(
            "--root-key", env="ROOT_KEY", help="the trust root's private key (the registry only)"
        ),
        option("--prefix", default="mesh", env="PREFIX", help="subject prefix of the mesh"),
        option(
            "--replicas",
            type=click.IntRange(1, 5),
            env="REPLICAS",
            help="JetStream replicas of the stores this agent creates [default: 3 on a cluster "
            "of three or more servers, else 1]",
        ),
        option(
            "--drain",
            default="10s",
            type=DURATION,
            env="DRAIN_TIMEOUT",
            help="bound on finishing in-flight work at stop",
        ),
        option(
            "--connect-timeout",
            default="10s",
            type=DURATION,
            env="CONNECT_TIMEOUT",
            help="bound on reaching NATS and loading the directory and policy at start",
        ),
        option(
            "--renewal-grace",
            default="7d",
            type=Duration(allow_zero=True),
            env="RENEWAL_GRACE",
            help="the registry only: how long after expiry a certificate may still be renewed "
            "with proof of its key (0s: never; a new join token is needed)",
        ),
        option(
            "--reload/--no-reload",
            default=False,
            help="development: restart the agent when its module or package changes",
        ),
        option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            env="LOG_LEVEL",
            help="the lowest level logged",
        ),
        option(
            "--log-format",
            type=click.Choice(["console", "json"]),
            default="console",
            env="LOG_FORMAT",
            help="how logs are written to stderr",
        ),
        option(
            "--traces",
            type=click.Choice(["none", "console", "otlp"]),
            default="none",
            env="TRACES",
            help="span exporter (otlp: the OTEL_EXPORTER_OTLP_* variables)",
        ),
        option(
            "--metrics-port",
            type=click.IntRange(0, 65535),
            env="METRICS_PORT",
            help="serve Prometheus metrics on this port",
        ),
        option(
            "--metrics-addr",
            default="0.0.0.0",  # noqa: S104  (a scrape target)
            env="METRICS_ADDR",
            help="address the metrics port binds: 0.0.0.0, :: or 127.0.0.1",
        ),
        option(
            "--access-log", is_flag=True, env="ACCESS_LOG", help="one JSON line per served request"
        ),
        option(
            "--allow-no-policy",
            is_flag=True,
            env="ALLOW_NO_POLICY",
            help="development mode: start with no policy when the mesh has no registry's head",
        ),
        option(
            "--delegate",
            is_flag=True,
            env="DELEGATE",
            help="start a delegation chain on every call this agent makes as an origin, so "
            "callees and their nested calls know it as the origin",
        ),
        option(
            "--pin",
            multiple=True,
            callback=_parse_pins,
            metavar="AGENT.ENDPOINT=HASH",
            env="SCHEMA_PINS",
            help="refuse to call AGENT's ENDPOINT while its instances announce another schema "
            "hash than HASH (as mesh-policy schemas prints it; repeatable; the variable takes "
            "pins separated by spaces)",
        ),
    ]


def _parse_pins(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``--pin agent.endpoint=sha256:...`` (repeatable) as ``MeshConfig.schema_pins``."""
    pins: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(
                f"{item!r} is not AGENT.ENDPOINT=HASH (e.g. researcher.answer=sha256:...)",
                ctx,
                param,
            )
        if key in pins:
            raise click.BadParameter(f"{key!r} is pinned twice", ctx, param)
        pins[key] = value
    try:
        MeshConfig(schema_pins=pins)
    except InvalidArgument as exc:
        raise click.BadParameter(exc.message, ctx, param) from None
    return pins


def cli() -> click.Group:
    """The ``mesh-agent`` command group."""
    grp = group(
        "mesh-agent",
        "Run mesh agents.",
        [
            command(
                "run",
                cmd_run,
                "run the agent TARGET: MODULE:ATTR or FILE.py:ATTR of a mesh.Agent, e.g. "
                "examples.research:planner",
                _run_options(),
            ),
            command(
                "demo",
                cmd_demo,
                "run a demo mesh on an embedded NATS server",
                [
                    option("--keep", is_flag=True, help="stay up and print the NATS URL"),
                    option(
                        "--gateway",
                        type=click.IntRange(0, 65535),
                        metavar="PORT",
                        help="stay up with the HTTP gateway on 127.0.0.1:PORT (0: a free port) "
                        "and print API keys and curl commands to try it",
                    ),
                ],
            ),
            gateway_command(),
            *mcp_commands(),
            completion_command("mesh-agent"),
        ],
    )
    grp.params.append(version_option())
    return grp


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mesh-agent``."""
    return run_main(cli(), "mesh-agent", argv)


if __name__ == "__main__":
    sys.exit(main())
