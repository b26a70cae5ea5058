"""natsmesh: a service mesh for autonomous agents over NATS.

Users import from here: what it takes to write an agent, call one, configure the mesh and
handle its errors. Control-plane code (the registry agent, operator tools) imports the rest
from ``mesh.control_plane``; every implementation module is private to the package.
"""

import inspect as _inspect

from mesh._connect import Mesh, connect, enrol
from mesh._core.config import DirectoryConfig, Limits, MeshConfig, RetryPolicy, Timeouts
from mesh._core.identity import Certificate, Identity, InstanceKeys, load_identity, save_identity
from mesh._core.policy import Policy, PolicyError, load_policy, parse_policy
from mesh._public import publish as _publish
from mesh._runtime.agent import Agent, Context, Peer
from mesh._runtime.ports import EndpointStats, MeshHandle
from mesh.errors import (
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

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Certificate",
    "CertificateError",
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
    "MeshHandle",
    "MessageTooLarge",
    "NotFound",
    "Peer",
    "PermissionDenied",
    "Policy",
    "PolicyError",
    "ResourceExhausted",
    "RetryPolicy",
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

# Classes and functions name this module, where users import them from (reprs, help, pickles).
for _name in __all__:
    _member = globals()[_name]
    if _inspect.isclass(_member) or _inspect.isfunction(_member):
        _publish(_member, __name__)
del _name, _member
