"""What the command-line tools share: the click conventions of every command (help with
defaults and environment variables, ``--version``, shell completion), durations, logging and
error exits.

Commands are plain functions of one ``Args`` (the parsed options as attributes, named as the
options are: ``--cert-ttl`` is ``args.cert_ttl``), wrapped into click commands by ``command``
with their options from ``option`` and ``argument``. ``main`` runs a click group the way every
entry point does: exit 2 with ``Error: ...`` for a usage error or a ``MeshError``, 130 on
Ctrl-C, the command's own code otherwise, and never a traceback for a mistake of the user's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import click
import structlog
from click.shell_completion import get_completion_class

from mesh import __version__
from mesh._core.policy import parse_duration as _parse_duration
from mesh.errors import InvalidArgument, MeshError

T = TypeVar("T")


def parse_duration(text: str) -> float:
    """``"7d"``, ``"24h"``, ``"30m"``, ``"1.5s"`` or ``"250ms"``, as seconds: the policy
    language's grammar (``mesh._core.policy.parse_duration``), so a number needs its unit.

    Raises:
        InvalidArgument: for anything else (``run_command`` prints it and exits 2).
    """
    try:
        return _parse_duration(text, bare_seconds=False)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message) from None


class Duration(click.ParamType):  # type: ignore[type-arg]
    """An option's duration (``24h``, ``30m``, ``1.5s``, ``250ms``): seconds as a float."""

    name = "duration"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero  # ``0s`` (and ``0``) turn a feature off

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        if self.allow_zero and str(value).strip() in ("0", "0s"):
            return 0.0
        try:
            return parse_duration(str(value))
        except InvalidArgument as exc:
            self.fail(exc.message, param, ctx)


DURATION = Duration()


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Structured logs to stderr for this process; JSON with ``fmt="json"``.

    The library (and the runner) log through stdlib loggers under ``mesh`` (``mesh._log``):
    a handler on the root logger renders every stdlib record (a mesh record's event name and
    fields come from its attributes) with structlog's renderer; structlog itself is
    configured the same way for agent code that logs with ``structlog.get_logger()``, so
    both read alike. Tracebacks are plain text (no local variables).
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamped: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[*stamped, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *stamped],  # fields first, as before
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mesh_cli", False)]:
        root.removeHandler(old)
    handler._mesh_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)


# Every command: -h as well as --help; defaults shown in the help of every option.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}
SHELLS = ("bash", "zsh", "fish")

Args = SimpleNamespace
"""A command's parsed options and arguments, as attributes."""


def option(*decls: str, help: str, env: str | None = None, **kwargs: Any) -> click.Option:
    """An option of a command: ``env`` names its ``MESH_<env>`` variable, shown in ``--help``
    beside the default (a flag's variable takes ``1``/``true``/``yes`` or ``0``/``false``/``no``).
    """
    envvar = f"MESH_{env}" if env else None
    return click.Option(decls, help=help, envvar=envvar, show_envvar=env is not None, **kwargs)


def argument(name: str, **kwargs: Any) -> click.Argument:
    """A positional argument (its meaning goes in the command's help: click shows none)."""
    return click.Argument([name], **kwargs)


def command(
    name: str,
    fn: Callable[[Args], int],
    help: str,
    params: Sequence[click.Parameter] = (),
) -> click.Command:
    """A click command that runs ``fn`` with the parsed values and exits with what it returns.

    Args:
        name: the command's name.
        fn: its body.
        help: one line: the summary in the group's list and the first line of ``--help``.
        params: its options and arguments.
    """

    def callback(**values: Any) -> int:
        return fn(Args(**values))

    return click.Command(
        name, callback=callback, params=list(params), help=help, context_settings=CONTEXT
    )


def group(name: str, help: str, commands: Sequence[click.Command]) -> click.Group:
    """A command group (``mesh-policy identity``): its commands listed in the given order."""
    grp = click.Group(name, help=help, context_settings=CONTEXT)
    for cmd in commands:
        grp.add_command(cmd)
    grp.list_commands = lambda ctx: [c.name or "" for c in commands]  # type: ignore[method-assign]
    return grp


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"natsmesh {__version__}")
        ctx.exit()


def version_option() -> click.Option:
    """``--version``: prints ``natsmesh <version>`` and exits 0."""
    return click.Option(
        ["--version"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="print natsmesh's version and exit",
    )


def completion_command(prog: str) -> click.Command:
    """``PROG completion bash|zsh|fish``: prints the shell's completion script for ``prog``.

    Completion itself is click's: the shell calls ``prog`` with ``_PROG_COMPLETE`` set.
    """
    var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())

    def run(args: Args) -> int:
        root = click.get_current_context().find_root().command
        completer = get_completion_class(args.shell)
        assert completer is not None  # click.Choice admits only the shells click knows
        click.echo(completer(root, {}, prog, var).source())
        return 0

    return command(
        "completion",
        run,
        f'print a shell completion script: eval "$({prog} completion bash)" in ~/.bashrc '
        f"(zsh: ~/.zshrc; fish: {prog} completion fish > ~/.config/fish/completions/{prog}.fish)",
        [argument("shell", type=click.Choice(SHELLS))],
    )


def main(cli: click.Group, prog: str, argv: Sequence[str] | None, **obj: Any) -> int:
    """Run an entry point's group on ``argv`` (default ``sys.argv[1:]``) and return its exit
    code: the command's; 0 for ``--help``/``--version``; 2 with ``Error: ...`` for a usage
    error or a ``MeshError``; 130 on Ctrl-C.

    Args:
        cli: the entry point's group.
        prog: its name in usage lines and completion.
        argv: the arguments.
        obj: kept as the click context's ``obj`` (``mesh-agent run --reload`` reads its argv).
    """
    args = list(sys.argv[1:] if argv is None else argv)

    def invoke() -> int:
        code = cli.main(args, prog_name=prog, standalone_mode=False, obj={"argv": args, **obj})
        return 0 if code is None else int(code)

    try:
        return int(run_command(invoke))
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl-C: click turns KeyboardInterrupt into Abort
        return 130


def run_command(fn: Callable[[], T]) -> T | int:
    """Run a command body; a ``MeshError`` prints ``ErrorType: message`` and exits 2."""
    try:
        return fn()
    except MeshError as exc:
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
