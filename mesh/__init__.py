"""natsmesh: a service mesh for autonomous agents over NATS.

Users import from here; every implementation module is private to the package.
"""

from .agent import Agent, Context, Peer
from .config import DirectoryConfig, Limits, MeshConfig, RetryPolicy, Timeouts
from .control import (
    AuditRecord,
    ControlStore,
    IssuedCertificate,
    JoinToken,
    PolicyRevision,
    Revocation,
    verify_audit_chain,
)
from .enrol import EnrolmentRequest, enrol, serve_enrolment
from .errors import (
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
    Unauthenticated,
    Unavailable,
)
from .governance import CertificateReply, DenialReport, RenewRequest
from .identity import (
    Certificate,
    CertificateVerifier,
    Identity,
    InstanceKeys,
    TrustRoot,
    load_identity,
    load_trust_root,
    save_identity,
    save_trust_root,
)
from .policy import (
    Decision,
    EndpointPolicy,
    Policy,
    PolicyEngine,
    PolicyError,
    canonical_policy_bytes,
    diff_policies,
    load_policy,
    parse_policy,
)
from .runtime import EndpointStats, Mesh, connect
from .signals import EdgeReport, EdgeStats, GraphEdge, SignalRow, SignalTable

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AuditRecord",
    "Certificate",
    "CertificateError",
    "CertificateReply",
    "CertificateVerifier",
    "Context",
    "ControlStore",
    "DeadlineExceeded",
    "Decision",
    "DecodeError",
    "DenialReport",
    "DirectoryConfig",
    "EdgeReport",
    "EdgeStats",
    "EndpointPolicy",
    "EndpointStats",
    "EnrolmentRequest",
    "FailedPrecondition",
    "GraphEdge",
    "Identity",
    "InstanceKeys",
    "Internal",
    "InvalidArgument",
    "IssuedCertificate",
    "JoinToken",
    "Limits",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "MessageTooLarge",
    "NotFound",
    "Peer",
    "PermissionDenied",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "PolicyRevision",
    "RenewRequest",
    "ResourceExhausted",
    "RetryPolicy",
    "Revocation",
    "SignalRow",
    "SignalTable",
    "Timeouts",
    "TrustRoot",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "canonical_policy_bytes",
    "connect",
    "diff_policies",
    "enrol",
    "load_identity",
    "load_policy",
    "load_trust_root",
    "parse_policy",
    "save_identity",
    "save_trust_root",
    "serve_enrolment",
    "verify_audit_chain",
]
