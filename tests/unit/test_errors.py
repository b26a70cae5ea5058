"""Unit tests for mesh.errors: the exception tree, wire codes and retry rules."""

from __future__ import annotations

import json

import pytest

import mesh
from mesh.errors import (
    CODES,
    Cancelled,
    CertificateError,
    DeadlineExceeded,
    DecodeError,
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
    error_from_code,
)

BY_CODE = {
    "INVALID_ARGUMENT": InvalidArgument,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "FAILED_PRECONDITION": FailedPrecondition,
    "CANCELLED": Cancelled,
    "INTERNAL": Internal,
}
ALL_CLASSES = [
    *BY_CODE.values(),
    DecodeError,
    CertificateError,
    MessageTooLarge,
    StreamBroken,
]


class TestCodes:
    def test_codes_cover_table(self) -> None:
        """CODES is exactly the set of wire codes."""
        assert frozenset(BY_CODE) == CODES

    @pytest.mark.parametrize(("code", "cls"), sorted(BY_CODE.items()))
    def test_error_from_code(self, code: str, cls: type[MeshError]) -> None:
        """Each wire code maps to its class (not a subclass), keeping the details."""
        exc = error_from_code(code, "msg", rule="r1", retry_after=1.5, subject="s.x")

        assert type(exc) is cls
        assert exc.code == code
        assert (exc.message, exc.rule, exc.retry_after, exc.subject) == ("msg", "r1", 1.5, "s.x")

    def test_unknown_code_is_internal(self) -> None:
        """A code this version does not know becomes Internal."""
        exc = error_from_code("SOMETHING_NEW", "msg")

        assert type(exc) is Internal

    @pytest.mark.parametrize("cls", ALL_CLASSES)
    def test_code_round_trips(self, cls: type[MeshError]) -> None:
        """Every class's code maps back to that class or the parent it shares the code with."""
        exc = cls("m")

        assert isinstance(exc, type(error_from_code(exc.code, "m")))

    @pytest.mark.parametrize("cls", ALL_CLASSES)
    def test_exported_from_mesh(self, cls: type[MeshError]) -> None:
        """Every error class is importable from the top-level package."""
        assert getattr(mesh, cls.__name__) is cls

    def test_str_has_code_and_message(self) -> None:
        """str() of an error is 'CODE: message'."""
        assert str(NotFound("no such agent")) == "NOT_FOUND: no such agent"


class TestHierarchy:
    def test_deadline_exceeded_is_timeout_error(self) -> None:
        """DeadlineExceeded can be caught as the builtin TimeoutError."""
        with pytest.raises(TimeoutError):
            raise DeadlineExceeded("late")

    @pytest.mark.parametrize(
        ("child", "parent"),
        [
            (DecodeError, InvalidArgument),
            (CertificateError, Unauthenticated),
            (MessageTooLarge, ResourceExhausted),
        ],
    )
    def test_subclasses_share_parent_code(
        self, child: type[MeshError], parent: type[MeshError]
    ) -> None:
        """Refined errors are caught by, and carry the code of, their parent."""
        assert issubclass(child, parent)
        assert child.code == parent.code

    @pytest.mark.parametrize("cls", ALL_CLASSES)
    def test_all_are_mesh_errors(self, cls: type[MeshError]) -> None:
        """Every error is a MeshError."""
        assert issubclass(cls, MeshError)


class TestRetryable:
    def test_unavailable_retryable(self) -> None:
        """Unavailable is always retryable."""
        assert Unavailable("down").retryable

    def test_resource_exhausted_without_retry_after(self) -> None:
        """ResourceExhausted without retry_after is not retryable."""
        assert not ResourceExhausted("busy").retryable

    def test_resource_exhausted_with_retry_after(self) -> None:
        """ResourceExhausted with retry_after is retryable."""
        assert ResourceExhausted("busy", retry_after=0.5).retryable

    def test_resource_exhausted_from_wire_with_retry_after(self) -> None:
        """A RESOURCE_EXHAUSTED from the wire with retry_after is retryable."""
        assert error_from_code("RESOURCE_EXHAUSTED", "busy", retry_after=0.5).retryable

    @pytest.mark.parametrize("retry_after", [None, 0.5])
    def test_message_too_large_never(self, retry_after: float | None) -> None:
        """MessageTooLarge is never retryable, even with retry_after."""
        assert not MessageTooLarge("big", retry_after=retry_after).retryable

    @pytest.mark.parametrize(
        "cls",
        [
            InvalidArgument,
            DecodeError,
            Unauthenticated,
            CertificateError,
            PermissionDenied,
            NotFound,
            DeadlineExceeded,
            FailedPrecondition,
            Internal,
        ],
    )
    def test_others_not_retryable(self, cls: type[MeshError]) -> None:
        """Every other error is not retryable, whatever its details."""
        assert not cls("x", retry_after=1.0).retryable


class TestWire:
    def test_minimal(self) -> None:
        """to_wire of a plain error is just code and message."""
        assert NotFound("gone").to_wire() == {"code": "NOT_FOUND", "message": "gone"}

    def test_details_included(self) -> None:
        """rule and retry_after are carried when set."""
        wire = PermissionDenied("no", rule="deny-all", retry_after=2.0).to_wire()

        assert wire == {
            "code": "PERMISSION_DENIED",
            "message": "no",
            "rule": "deny-all",
            "retry_after": 2.0,
        }

    @pytest.mark.parametrize("cls", ALL_CLASSES)
    def test_no_python_repr(self, cls: type[MeshError]) -> None:
        """to_wire is plain JSON data with no repr of the error, its cause or its class."""
        secret = "secret-detail-42"
        try:
            try:
                raise ValueError(secret)
            except ValueError as cause:
                raise cls("handler failed", subject="mesh.rpc.bob") from cause
        except MeshError as exc:
            wire = exc.to_wire()
            text = json.dumps(wire)

        assert set(wire) <= {"code", "message", "rule", "retry_after"}
        assert all(isinstance(v, str | int | float) for v in wire.values())
        assert secret not in text
        assert "Traceback" not in text
        assert cls.__name__ + "(" not in text
        assert "ValueError" not in text
        assert "mesh.rpc.bob" not in text
