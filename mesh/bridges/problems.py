"""Mesh errors as HTTP answers: the status, the RFC 9457 ``application/problem+json`` body and
the headers (``Retry-After``, ``WWW-Authenticate``) the HTTP gateway sends for each.

Pure: no HTTP library. The table is ``docs/gateway.md``'s "Statuses"; ``problem_for`` is the one
place that maps a ``MeshError`` (raised by the mesh call, or by the gateway itself for what it
answers without calling: a bad key, malformed JSON, a body too large).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamBroken,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "problem_for",
    "problem_schema",
]

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:natsmesh:problem:"
# (status, title) by wire code, for errors the mesh call raised.
_BY_CODE: dict[str, tuple[int, str]] = {
    InvalidArgument.code: (400, "Invalid argument"),
    Unauthenticated.code: (502, "Mesh authentication failed"),
    PermissionDenied.code: (403, "Permission denied"),
    NotFound.code: (404, "Not found"),
    DeadlineExceeded.code: (504, "Deadline exceeded"),
    ResourceExhausted.code: (429, "Resource exhausted"),
    Unavailable.code: (503, "Unavailable"),
    FailedPrecondition.code: (409, "Failed precondition"),
    Cancelled.code: (499, "Cancelled"),
    Internal.code: (500, "Internal error"),
}
INTERNAL_DETAIL = "the endpoint failed"


@dataclass
class Problem:
    """An HTTP error answer.

    Attributes:
        status: the HTTP status.
        body: the problem document (``type``, ``title``, ``status``, ``detail``, ``code``, and
            ``rule`` or ``retry_after`` when the error carries them).
        headers: extra response headers.
    """

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return str(self.body.get("code", ""))

    def encoded(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


def _type(code: str) -> str:
    return TYPE_BASE + code.lower().replace("_", "-")


def problem_for(
    exc: MeshError,
    *,
    instance: str | None = None,
    status: int | None = None,
    kind: str | None = None,
    title: str | None = None,
) -> Problem:
    """The HTTP answer for ``exc``.

    Args:
        exc: the error.
        instance: the request's path, for the body's ``instance``.
        status: the status when the gateway itself decided (a bad key: 401; a body too
            large: 413; an agent it does not expose: 404), instead of the code's.
        kind: the problem's type suffix in place of the code's (``invalid-key``).
        title: its title in place of the code's.

    Returns:
        The status, body and headers: ``Retry-After`` (whole seconds, at least 1) when the
        error says when to retry; ``WWW-Authenticate`` on a 401.
    """
    code = exc.code if exc.code in _BY_CODE else Internal.code
    default_status, default_title = _BY_CODE[code]
    if status is None:
        status = default_status
        if isinstance(exc, MessageTooLarge):
            status, default_title = 413, "Content too large"
        elif isinstance(exc, StreamBroken):
            status, default_title = 502, "Stream broken"
    detail = exc.message if code != Internal.code else (exc.message or INTERNAL_DETAIL)
    body: dict[str, Any] = {
        "type": TYPE_BASE + kind if kind else _type(code),
        "title": title or default_title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if exc.rule is not None:
        body["rule"] = exc.rule
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        body["retry_after"] = exc.retry_after
        if status in (429, 503):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if instance is not None:
        body["instance"] = instance
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="natsmesh", error="invalid_token"'
    return Problem(status, body, headers)


def problem_schema() -> dict[str, Any]:
    """The JSON Schema of the problem body (OpenAPI's ``components.schemas.Problem``)."""
    return {
        "type": "object",
        "title": "Problem",
        "description": "RFC 9457 problem details, with the mesh's error code",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": sorted(_BY_CODE)},
            "rule": {"type": "string", "description": "the policy rule that denied the call"},
            "retry_after": {"type": "number", "description": "seconds before trying again"},
            "instance": {"type": "string", "description": "the request's path"},
        },
    }
