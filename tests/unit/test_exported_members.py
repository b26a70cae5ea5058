"""The public API: ``mesh.__all__`` (the SDK for agents) and ``mesh.control_plane.__all__`` (the
registry agent and operator tools) are frozen, sorted, complete and name only things that
exist; their classes and functions say which of the two modules they come from."""

from __future__ import annotations

import inspect
import pickle
import typing
from types import ModuleType

import pytest
from pydantic import BaseModel, TypeAdapter

import mesh
import mesh.control_plane

SDK = [
    "Agent",
    "Cancelled",
    "Certificate",
    "CertificateError",
    "CircuitOpen",
    "Context",
    "DeadlineExceeded",
    "DecodeError",
    "Delegate",
    "Delegation",
    "DelegationRefused",
    "DirectoryConfig",
    "EndpointSchema",
    "EndpointStats",
    "FailedPrecondition",
    "Identity",
    "InstanceKeys",
    "Internal",
    "InvalidArgument",
    "Limits",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "MeshHandle",
    "MessageTooLarge",
    "NotFound",
    "Peer",
    "PermissionDenied",
    "Policy",
    "PolicyError",
    "Progress",
    "ResourceExhausted",
    "RetryPolicy",
    "Stream",
    "StreamBroken",
    "Timeouts",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "connect",
    "enrol",
    "load_identity",
    "load_policy",
    "parse_policy",
    "save_identity",
]

CONTROL_PLANE = [
    "ADMIN_ROLE",
    "DEFAULT_CERT_TTL",
    "DENIAL_TOPIC",
    "GATEWAY_KEY_ISSUE",
    "GATEWAY_KEY_LIST",
    "GATEWAY_KEY_REVOKE",
    "REGISTRY",
    "ROOT_KEY_FILE",
    "SIGNALS_TOPIC",
    "ApplyReply",
    "ApplyRequest",
    "AuditRecord",
    "CertificateReply",
    "CertificateVerifier",
    "ControlStore",
    "Decision",
    "DenialReport",
    "EdgeReport",
    "EdgeStats",
    "Empty",
    "EndpointPolicy",
    "EnrolmentRequest",
    "GatewayKeyInfo",
    "GatewayKeyIssueReply",
    "GatewayKeyIssueRequest",
    "GatewayKeyList",
    "GatewayKeyRevokeReply",
    "GatewayKeyRevokeRequest",
    "GatewayKeyStore",
    "GraceRenewal",
    "GraphEdge",
    "Head",
    "HeadKeeper",
    "HistoryReply",
    "IdentityInfo",
    "IdentityList",
    "IssuedCertificate",
    "JoinToken",
    "PolicyEngine",
    "PolicyRevision",
    "RenewRequest",
    "RevisionInfo",
    "Revocation",
    "RevokeReply",
    "RevokeRequest",
    "RollbackRequest",
    "SavedState",
    "SignalRow",
    "SignalTable",
    "SignalsReply",
    "SignalsRequest",
    "TokenReply",
    "TokenRequest",
    "TrafficRow",
    "TrustRoot",
    "canonical_policy_bytes",
    "diff_policies",
    "load_trust_root",
    "parse_canonical",
    "policy_text",
    "save_trust_root",
    "serve_enrolment",
    "serve_grace_renewal",
    "verify_audit_chain",
]

SURFACES = [(mesh, SDK), (mesh.control_plane, CONTROL_PLANE)]
MODULES = pytest.mark.parametrize("module", [m for m, _ in SURFACES], ids=lambda m: m.__name__)


def _defined_in_package(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "mesh" or module.startswith("mesh.")


def _members(module: ModuleType) -> dict[str, object]:
    """The exported classes and functions."""
    return {
        name: value
        for name in module.__all__
        if inspect.isclass(value := getattr(module, name)) or inspect.isfunction(value)
    }


def _ruff_order(name: str) -> tuple[int, str]:
    """How ``ruff`` (RUF022) sorts ``__all__``: constants, then classes, then the rest."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


@pytest.mark.parametrize(("module", "frozen"), SURFACES, ids=lambda m: getattr(m, "__name__", ""))
def test_all_is_frozen(module: ModuleType, frozen: list[str]) -> None:
    """A name enters or leaves the public API only with this list."""
    assert module.__all__ == frozen


def test_surfaces_are_disjoint() -> None:
    """Each public name has one home: agents import from ``mesh``, control-plane code from
    ``mesh.control_plane`` as well."""
    assert set(mesh.__all__) & set(mesh.control_plane.__all__) == set()


@MODULES
def test_all_is_sorted(module: ModuleType) -> None:
    """``__all__`` is sorted (the way ruff sorts it) and has no duplicates."""
    assert module.__all__ == sorted(set(module.__all__), key=_ruff_order)


@MODULES
def test_all_names_exist(module: ModuleType) -> None:
    """Every name in ``__all__`` is an attribute of the module."""
    missing = [name for name in module.__all__ if not hasattr(module, name)]

    assert missing == []


@MODULES
def test_public_members_are_exported(module: ModuleType) -> None:
    """Every public class or function the module binds at top level is in ``__all__``."""
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and _defined_in_package(value)
    }

    assert sorted(public - set(module.__all__)) == []


@MODULES
def test_star_import_matches_all(module: ModuleType) -> None:
    """``from <module> import *`` binds exactly the names in ``__all__``."""
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)
    namespace.pop("__builtins__")

    assert sorted(namespace) == sorted(module.__all__)


@MODULES
def test_members_name_their_public_module(module: ModuleType) -> None:
    """Exported classes and functions report the module users import them from (in reprs,
    ``help`` and tracebacks), not the private one that defines them."""
    wrong = {
        name: value.__module__
        for name, value in _members(module).items()
        if value.__module__ != module.__name__
    }

    assert wrong == {}


@MODULES
def test_exported_models_are_complete(module: ModuleType) -> None:
    """Renaming the module leaves every pydantic model built: none waits on a forward
    reference that would now be looked up in the public module."""
    incomplete = [
        name
        for name, value in _members(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and not value.__pydantic_complete__
    ]

    assert incomplete == []


def test_exported_objects_pickle_and_repr() -> None:
    """Pickle finds classes by ``__module__``, so it must be where they are exported."""
    error = pickle.loads(pickle.dumps(mesh.PermissionDenied("no", rule="r")))
    config = pickle.loads(pickle.dumps(mesh.MeshConfig()))
    reply = mesh.control_plane.ApplyReply(revision=3, changes=["rule a added"])
    revision = mesh.control_plane.PolicyRevision(
        revision=1, policy_json=b"{}", source="s", applied_by="a", applied_at=0.0
    )

    assert isinstance(error, mesh.PermissionDenied)
    assert (error.message, error.rule) == ("no", "r")
    assert config == mesh.MeshConfig()
    assert pickle.loads(pickle.dumps(reply)) == reply
    assert pickle.loads(pickle.dumps(revision)) == revision
    assert repr(reply) == "ApplyReply(revision=3, changes=['rule a added'], unchanged=False)"
    assert mesh.control_plane.ApplyReply.model_validate_json(reply.model_dump_json()) == reply
    assert pickle.loads(pickle.dumps(mesh.connect)) is mesh.connect


def test_annotations_still_resolve() -> None:
    """String annotations are looked up in the module ``__module__`` names; they were resolved
    where they were written, so type hints and pydantic still see the types."""
    hints = typing.get_type_hints(mesh.control_plane.AuditRecord)
    schema = TypeAdapter(list[mesh.control_plane.AuditRecord]).json_schema()

    assert hints["details"] == dict[str, typing.Any]
    assert "details" in schema["$defs"]["AuditRecord"]["properties"]
    assert typing.get_type_hints(mesh.PermissionDenied)["code"] == typing.ClassVar[str]
    assert (
        typing.get_type_hints(mesh.control_plane.SignalsRequest)["reporter"]
        == (typing.Literal["server", "client"])
    )
