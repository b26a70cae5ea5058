"""The mesh's one exception tree, and the stable error codes that travel on the wire.

```
MeshError                      code            retryable
├── InvalidArgument            INVALID_ARGUMENT
│   └── DecodeError            INVALID_ARGUMENT   (malformed bytes; all the decoder raises)
├── Unauthenticated            UNAUTHENTICATED
│   └── CertificateError       UNAUTHENTICATED    (expired, not yet valid, wrong root, forged)
├── PermissionDenied           PERMISSION_DENIED  (.rule names the rule that decided)
│   └── DelegationRefused      PERMISSION_DENIED  (rule "delegation": a chain refused)
├── NotFound                   NOT_FOUND          (unknown agent, instance or endpoint)
├── DeadlineExceeded           DEADLINE_EXCEEDED  (also a builtin TimeoutError)
├── ResourceExhausted          RESOURCE_EXHAUSTED (retryable when .retry_after is set)
│   └── MessageTooLarge        RESOURCE_EXHAUSTED (never retryable)
├── Unavailable                UNAVAILABLE        yes
│   ├── CircuitOpen            UNAVAILABLE        no (fails fast; .retry_after says when to try)
│   └── StreamBroken           UNAVAILABLE        no (a streamed reply lost a frame in transit)
├── FailedPrecondition         FAILED_PRECONDITION (e.g. used before ready, after close)
├── Cancelled                  CANCELLED          (the caller cancelled the call)
└── Internal                   INTERNAL           (a handler raised; the message is safe)
```

Remote errors map back to these classes by code (`error_from_code`), so a caller writes
`except mesh.PermissionDenied as exc: print(exc.rule)` whatever process raised it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "Cancelled",
    "CertificateError",
    "CircuitOpen",
    "DeadlineExceeded",
    "DecodeError",
    "DelegationRefused",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MeshError",
    "MessageTooLarge",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamBroken",
    "Unauthenticated",
    "Unavailable",
    "error_from_code",
]


class MeshError(Exception):
    """Root of every error the mesh raises.

    Attributes:
        code: the stable wire code (e.g. ``"PERMISSION_DENIED"``).
        message: a human-readable explanation, safe to show to a remote caller.
        rule: for authorization decisions, the rule that decided (else ``None``).
        retry_after: seconds the caller should wait before trying again (else ``None``).
        subject: the NATS subject involved, when one is known.
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        rule: str | None = None,
        retry_after: float | None = None,
        subject: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.retry_after = retry_after
        self.subject = subject

    @property
    def retryable(self) -> bool:
        """Whether a caller may retry the same request (for idempotent calls only)."""
        return False

    def to_wire(self) -> dict[str, Any]:
        """The error as carried in a reply body: code, message and the typed details."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.rule is not None:
            out["rule"] = self.rule
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(MeshError):
    """The request or message is malformed or fails validation."""

    code = "INVALID_ARGUMENT"


class DecodeError(InvalidArgument):
    """Bytes that are not a well-formed mesh envelope (or certificate, or record)."""


class Unauthenticated(MeshError):
    """The sender could not be authenticated (bad seal or signature, unknown or bad certificate,
    replayed or stale message)."""

    code = "UNAUTHENTICATED"


class CertificateError(Unauthenticated):
    """A certificate is expired, not yet valid, from another trust root, or badly signed."""


class PermissionDenied(MeshError):
    """Policy refused the call; ``rule`` names the rule that decided."""

    code = "PERMISSION_DENIED"


class DelegationRefused(PermissionDenied):
    """A delegation chain that does not verify, or does not allow the call: the message names
    the link and what is wrong with it (``docs/protocol.md`` section 37); ``rule`` is
    ``"delegation"``."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs["rule"] = "delegation"
        super().__init__(message, **kwargs)


class NotFound(MeshError):
    """No such agent, instance or endpoint."""

    code = "NOT_FOUND"


class DeadlineExceeded(MeshError, TimeoutError):
    """The request's deadline passed before a reply."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(MeshError):
    """A limit was hit; retryable when the callee said when (``retry_after``)."""

    code = "RESOURCE_EXHAUSTED"

    @property
    def retryable(self) -> bool:
        return self.retry_after is not None


class MessageTooLarge(ResourceExhausted):
    """A body exceeds the maximum size; checked before sending and before decrypting."""

    @property
    def retryable(self) -> bool:
        return False


class Unavailable(MeshError):
    """No instance could take the request (none known, none responding, or it went away)."""

    code = "UNAVAILABLE"

    @property
    def retryable(self) -> bool:
        return True


class CircuitOpen(Unavailable):
    """The caller's circuit breaker for the destination is open: the call was not sent.

    Not retried by the mesh (an attempt against an open circuit would fail the same way at
    once); ``retry_after`` says when the circuit lets a probe through.
    """

    @property
    def retryable(self) -> bool:
        return False


class StreamBroken(Unavailable):
    """A streamed reply's frames did not arrive as sent: one is missing or out of order, or the
    callee sent beyond the credit it was granted (``docs/protocol.md`` section 21). Chunks
    already delivered were genuine and in order; what follows cannot be trusted, so the stream
    ends here. Never retried: part of the stream was consumed."""

    @property
    def retryable(self) -> bool:
        return False


class FailedPrecondition(MeshError):
    """The operation is not allowed in the current state (not ready, closed, draining)."""

    code = "FAILED_PRECONDITION"


class Cancelled(MeshError):
    """The caller cancelled the call (its task was cancelled, it left a stream, or a call it
    depends on was cancelled): the callee's handler is cancelled too, and every call it made in
    turn (``docs/protocol.md`` section 21)."""

    code = "CANCELLED"


class Internal(MeshError):
    """The remote handler failed; the message never carries the exception's repr."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        FailedPrecondition,
        Cancelled,
        Internal,
    )
}

CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_code(
    code: str,
    message: str,
    *,
    rule: str | None = None,
    retry_after: float | None = None,
    subject: str | None = None,
) -> MeshError:
    """Build the exception for a wire error code; unknown codes become ``Internal``.

    Args:
        code: the wire code, e.g. ``"NOT_FOUND"``.
        message: the remote's message.
        rule: the deciding rule, for denials.
        retry_after: seconds to wait, for RESOURCE_EXHAUSTED.
        subject: the subject the error concerns.

    Returns:
        An instance of the matching ``MeshError`` subclass.
    """
    cls = _BY_CODE.get(code, Internal)
    if cls is PermissionDenied and rule == "delegation":
        cls = DelegationRefused
    return cls(message, rule=rule, retry_after=retry_after, subject=subject)
