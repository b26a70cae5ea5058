"""natsmesh: a service mesh for autonomous agents over NATS.

Users import from here; every implementation module is private to the package.
"""

from .agent import Agent, Context, Peer
from .config import DirectoryConfig, Limits, MeshConfig, RetryPolicy, Timeouts
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
from .runtime import EndpointStats, Mesh, connect

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Certificate",
    "CertificateError",
    "CertificateVerifier",
    "Context",
    "DeadlineExceeded",
    "DecodeError",
    "DirectoryConfig",
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
    "MessageTooLarge",
    "NotFound",
    "Peer",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Timeouts",
    "TrustRoot",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "connect",
    "load_identity",
    "load_trust_root",
    "save_identity",
    "save_trust_root",
]
