"""The access log: one JSON line per served or refused request (and, on the caller's side, per
call a policy's fault delayed or aborted), never the payload."""

from __future__ import annotations

import sys
from typing import Any

import structlog

__all__ = ["AccessLog"]


def _access_logger() -> Any:
    # JSON lines on stdout whatever the application's structlog setup: an access log is data,
    # so neither a configured level filter (wrapper_class) nor its processors apply to it.
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stdout),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )


class AccessLog:
    """Writes access-log lines for one agent instance (JSON on stdout: an access log is data).

    Args:
        agent / instance: the callee named in each line.
    """

    def __init__(self, agent: str, instance: str) -> None:
        self._agent = agent
        self._instance = instance
        self._logger: Any = None

    def write(
        self,
        *,
        caller: str,
        caller_instance: str,
        endpoint: str,
        code: str,
        seconds: float,
        request_bytes: int,
        reply_bytes: int,
        traceparent: str | None,
        attempt: int,
        rule: str | None = None,
        origin: str | None = None,
    ) -> None:
        """One JSON line for a served or refused request (``rule``: the policy rule of a
        denial, when one decided; ``origin``: who a delegated call was made for, such as the
        principal an HTTP gateway named); never the payload."""
        if self._logger is None:
            self._logger = _access_logger()
        self._logger.info(
            "access",
            caller=caller,
            caller_instance=caller_instance,
            callee=self._agent,
            callee_instance=self._instance,
            endpoint=endpoint,
            code=code,
            duration_ms=round(seconds * 1000, 3),
            request_bytes=request_bytes,
            reply_bytes=reply_bytes,
            trace_id=traceparent.split("-")[1] if traceparent and "-" in traceparent else None,
            attempt=attempt,
            rule=rule,
            origin=origin,
        )

    def write_client(
        self,
        *,
        callee: str,
        endpoint: str,
        code: str | None,
        traceparent: str | None,
        **marks: str,
    ) -> None:
        """One JSON line, on the caller's side (``side: client``), for an attempt traffic
        management decided without the callee: a policy's fault delayed or aborted it
        (``fault``, ``rule``; ``code``: the abort's, ``None`` for a delay), or an open circuit
        refused it (``circuit: open``, ``destination``)."""
        if self._logger is None:
            self._logger = _access_logger()
        self._logger.info(
            "access",
            side="client",
            caller=self._agent,
            caller_instance=self._instance,
            callee=callee,
            endpoint=endpoint,
            code=code,
            **marks,
            trace_id=traceparent.split("-")[1] if traceparent and "-" in traceparent else None,
        )
