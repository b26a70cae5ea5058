"""The registry's API as the data plane and the operator tools speak it: subjects, topics and
the request and reply models of the registry agent's endpoints.

The registry agent (``mesh_agents.registry``) serves these; agents (renewal, denial reports)
and ``mesh-policy`` call them. They live in the SDK so that callers need not import the agent.
"""

from __future__ import annotations

import base64

from pydantic import BaseModel

from mesh._core.identity import Certificate

__all__ = ["DENIAL_TOPIC", "REGISTRY", "CertificateReply", "DenialReport", "RenewRequest"]

REGISTRY = "registry"
"""The registry agent's name."""
DENIAL_TOPIC = "mesh-denied"
"""The topic on which callees report denials to the registry."""


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
