"""The library's logs: stdlib ``logging`` under the ``mesh`` logger, silent unless configured.

A library does not choose where its logs go: every module logs through a stdlib logger named
after it (``mesh._runtime.server``, ...), and the ``mesh`` logger holds a ``NullHandler``, so
an application that configured nothing sees nothing (not even Python's last-resort handler
for warnings). ``logging.basicConfig(...)``, or any handler on the root or ``mesh`` logger,
turns them on; ``mesh-agent`` and ``mesh-policy`` configure them for their own process
(``mesh.cli._common.configure_logging``).

A call keeps the structured form the call sites were written in, an event name and fields::

    log.error("mesh.handler_failed", endpoint="echo", caller="alice", error_type="ValueError")

The record's message is ``mesh.handler_failed endpoint=echo caller=alice error_type=ValueError``
(readable with a plain ``basicConfig``), and the event and each field are also attributes of
the record (``record.event``, ``record.endpoint``, ...) for structured formatters (structlog's
``ExtraAdder``, python-json-logger). A disabled level costs one ``isEnabledFor`` check: the
message and the fields are built only for a record that will be handled.

Rules for the call sites: never a payload, a body or an exception's message (which may quote
the payload) at INFO, WARNING or ERROR: log the exception's type; the traceback
(``exc_info=True``) only at DEBUG. Tracebacks are the stdlib's, without local variables.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["KeyLogger", "get_logger"]

logging.getLogger("mesh").addHandler(logging.NullHandler())

# Attributes of a LogRecord a field must not overwrite (``extra`` refuses them).
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


def _text(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class KeyLogger:
    """A stdlib logger called with an event name and key=value fields."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        """The stdlib logger underneath."""
        return self._logger

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        message = " ".join([event, *(f"{k}={_text(v)}" for k, v in fields.items())])
        extra = {(f"{k}_" if k in _RESERVED else k): v for k, v in fields.items()}
        extra["event"] = event
        # stacklevel 3: the record names the call site, not this module.
        self._logger.log(level, "%s", message, exc_info=exc_info or None, extra=extra, stacklevel=3)

    def debug(self, event: str, /, *, exc_info: bool = False, **fields: Any) -> None:
        """An event at DEBUG; ``exc_info=True`` adds the current traceback (DEBUG only)."""
        if self._logger.isEnabledFor(logging.DEBUG):
            self._log(logging.DEBUG, event, exc_info, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        """An event at INFO."""
        if self._logger.isEnabledFor(logging.INFO):
            self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        """An event at WARNING."""
        if self._logger.isEnabledFor(logging.WARNING):
            self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, /, **fields: Any) -> None:
        """An event at ERROR (no traceback: log one with ``debug(..., exc_info=True)``)."""
        if self._logger.isEnabledFor(logging.ERROR):
            self._log(logging.ERROR, event, False, fields)


def get_logger(name: str) -> KeyLogger:
    """The logger of a module of the mesh (``name`` must be ``mesh`` or start with ``mesh.``)."""
    if name != "mesh" and not name.startswith("mesh."):
        raise ValueError(f"mesh loggers live under 'mesh', not {name!r}")
    return KeyLogger(logging.getLogger(name))
