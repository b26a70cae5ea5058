"""The registry's API as the data plane and the operator tools speak it: subjects, topics and
the request and reply models of the registry agent's endpoints.

The registry agent (``mesh_agents.registry``) serves these; agents (renewal, denial reports)
and ``mesh-policy`` call them. They live in the SDK so that callers need not import the agent;
``mesh.control_plane`` exports them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, Field

from mesh._core.identity import Certificate
from mesh._core.signals import GraphEdge, SignalRow, TrafficRow
from mesh._runtime.control import IssuedCertificate, PolicyRevision

__all__ = [
    "ADMIN_ROLE",
    "DEFAULT_CERT_TTL",
    "DENIAL_TOPIC",
    "REGISTRY",
    "ApplyReply",
    "ApplyRequest",
    "CertificateReply",
    "DenialReport",
    "Empty",
    "HistoryReply",
    "IdentityInfo",
    "IdentityList",
    "RenewRequest",
    "RevisionInfo",
    "RevokeReply",
    "RevokeRequest",
    "RollbackRequest",
    "SignalsReply",
    "SignalsRequest",
    "TokenReply",
    "TokenRequest",
]

REGISTRY = "registry"
"""The registry agent's name."""
DENIAL_TOPIC = "mesh-denied"
"""The topic on which callees report denials to the registry."""
ADMIN_ROLE = "admin"
"""The role the registry requires of callers of every endpoint but ``renew``."""
DEFAULT_CERT_TTL = 24 * 3600.0
"""The lifetime of certificates the registry issues, unless a join token says otherwise."""


class DenialReport(BaseModel):
    """What a callee tells the registry about a request policy denied (for the audit log)."""

    caller: str
    caller_instance: str
    caller_serial: str
    agent: str
    endpoint: str
    rule: str
    revision: int | None
    audit_only: bool = False
    suppressed: int = 0
    origin: str | None = None
    """Who the denied call was on behalf of, when it came with a delegation chain."""
    path: list[str] | None = None
    """The agents it came through, origin's first, the caller last."""


class RenewRequest(BaseModel):
    """Ask the registry for a fresh certificate for the caller's own keys."""


class CertificateReply(BaseModel):
    """A certificate, base64 of its wire bytes."""

    certificate: str

    @classmethod
    def of(cls, cert: Certificate) -> CertificateReply:
        return cls(certificate=base64.b64encode(cert.raw).decode())

    def raw(self) -> bytes:
        return base64.b64decode(self.certificate)


class Empty(BaseModel):
    """No fields."""


class ApplyRequest(BaseModel):
    policy: str = Field(description="the policy file's YAML text")
    source: str = Field(default="<cli>", description="where it came from, for errors and audit")


class ApplyReply(BaseModel):
    revision: int
    changes: list[str]
    unchanged: bool = False


class RevisionInfo(BaseModel):
    revision: int
    source: str
    applied_by: str
    applied_at: float
    sha256: str
    rollback_of: int | None = None
    policy: dict[str, Any]

    @classmethod
    def of(cls, rev: PolicyRevision) -> RevisionInfo:
        return cls(
            revision=rev.revision,
            source=rev.source,
            applied_by=rev.applied_by,
            applied_at=rev.applied_at,
            sha256=rev.sha256,
            rollback_of=rev.rollback_of,
            policy=json.loads(rev.policy_json),
        )


class HistoryReply(BaseModel):
    revisions: list[RevisionInfo]


class RollbackRequest(BaseModel):
    revision: int


class TokenRequest(BaseModel):
    agent: str
    roles: list[str] = []
    ttl: float = Field(default=3600.0, gt=0, description="how long the token may be used")
    cert_ttl: float = Field(default=DEFAULT_CERT_TTL, gt=60)


class TokenReply(BaseModel):
    token: str
    expires_at: float


class RevokeRequest(BaseModel):
    target: str = Field(description="a certificate serial, or an agent name (all its serials)")


class RevokeReply(BaseModel):
    revoked: list[str]


class IdentityInfo(BaseModel):
    """An ``IssuedCertificate`` as ``identities`` lists it: its fields but the certificate's
    bytes, and whether it is revoked."""

    serial: str
    agent: str
    instance: str
    roles: list[str]
    not_after: int
    issued_at: float
    via: str
    revoked: bool

    @classmethod
    def of(cls, issued: IssuedCertificate, *, revoked: bool) -> IdentityInfo:
        mirrored = {f.name: getattr(issued, f.name) for f in fields(issued)}
        return cls.model_validate(
            {k: v for k, v in mirrored.items() if k in cls.model_fields} | {"revoked": revoked}
        )


class IdentityList(BaseModel):
    identities: list[IdentityInfo]
    root_key_id: str = ""
    root_not_after: float | None = None


class SignalsRequest(BaseModel):
    reporter: Literal["server", "client"] = "server"
    by_caller: bool = True


class SignalsReply(BaseModel):
    window_s: float
    rows: list[SignalRow]
    edges: list[GraphEdge]
    nodes: list[str]
    traffic: list[TrafficRow] = []
    """Callers' open circuits and ejected instances (``SignalTable.traffic``)."""
