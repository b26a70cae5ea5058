"""What the command-line tools share: durations, environment defaults, logging, error exits."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

import structlog

from mesh.errors import InvalidArgument, MeshError

T = TypeVar("T")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"24h"``, ``"30m"``, ``"1.5s"``, ``"250ms"`` or plain seconds, as seconds.

    Raises:
        InvalidArgument: for anything else.
    """
    m = _DURATION.match(text)
    if m is None:
        raise InvalidArgument(f"invalid duration {text!r}: use e.g. 250ms, 10s, 30m, 24h, 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def env_default(name: str, default: str | None = None) -> str | None:
    """The value of ``MESH_<name>``, or ``default``."""
    return os.environ.get(f"MESH_{name}", default)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Structured logs to stderr; JSON with ``fmt="json"``."""
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def run_command(fn: Callable[[], T]) -> T | int:
    """Run a command body; a ``MeshError`` prints ``ErrorType: message`` and exits 2."""
    try:
        return fn()
    except MeshError as exc:
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
