"""What the command-line tools share: durations, environment defaults, logging, error exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import structlog

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


def env_default(name: str, default: str | None = None) -> str | None:
    """The value of ``MESH_<name>``, or ``default``."""
    return os.environ.get(f"MESH_{name}", default)


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


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: prints ``natsmesh <version>`` and exits 0."""
    parser.add_argument("--version", action="version", version=f"natsmesh {__version__}")


def run_command(fn: Callable[[], T]) -> T | int:
    """Run a command body; a ``MeshError`` prints ``ErrorType: message`` and exits 2."""
    try:
        return fn()
    except MeshError as exc:
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
