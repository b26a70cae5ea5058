"""natsmesh: a service mesh for autonomous agents over NATS.

Users import from here: what it takes to write an agent, call one, configure the mesh and
handle its errors. Control-plane code (the registry agent, operator tools) imports the rest
from ``mesh.control_plane``; every implementation module is private to the package.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from mesh import _log  # noqa: F401  (the NullHandler on the "mesh" logger, as every import)

if _TYPE_CHECKING:
    from mesh._connect import Mesh, connect, enrol
    from mesh._core.config import DirectoryConfig, Limits, MeshConfig, RetryPolicy, Timeouts
    from mesh._core.delegation import Delegate, Delegation
    from mesh._core.identity import (
        Certificate,
        Identity,
        InstanceKeys,
        load_identity,
        save_identity,
    )
    from mesh._core.policy import Policy, PolicyError, load_policy, parse_policy
    from mesh._core.schemas import EndpointSchema
    from mesh._runtime.agent import Agent, Context, Peer
    from mesh._runtime.ports import EndpointStats, MeshHandle
    from mesh._runtime.streams import Progress, Stream
    from mesh.errors import (
        Cancelled,
        CertificateError,
        CircuitOpen,
        DeadlineExceeded,
        DecodeError,
        DelegationRefused,
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

__version__ = "0.1.0"

__all__ = [
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

# Where each name is defined. ``import mesh`` (and so ``import mesh.cli``, the entry points'
# package) imports none of it: the first name looked up imports them all (about 0.6 s of
# nats-py, OpenTelemetry and pydantic), so the command-line tools can honour Ctrl-C from
# their first instant (``mesh.cli.run``).
_SOURCES = {
    **dict.fromkeys(["Mesh", "connect", "enrol"], "mesh._connect"),
    **dict.fromkeys(
        ["DirectoryConfig", "Limits", "MeshConfig", "RetryPolicy", "Timeouts"], "mesh._core.config"
    ),
    **dict.fromkeys(["Delegate", "Delegation"], "mesh._core.delegation"),
    **dict.fromkeys(
        ["Certificate", "Identity", "InstanceKeys", "load_identity", "save_identity"],
        "mesh._core.identity",
    ),
    **dict.fromkeys(["Policy", "PolicyError", "load_policy", "parse_policy"], "mesh._core.policy"),
    "EndpointSchema": "mesh._core.schemas",
    **dict.fromkeys(["Agent", "Context", "Peer"], "mesh._runtime.agent"),
    **dict.fromkeys(["EndpointStats", "MeshHandle"], "mesh._runtime.ports"),
    **dict.fromkeys(["Progress", "Stream"], "mesh._runtime.streams"),
}


def _load() -> None:
    """Import every exported name into this module and make it name ``mesh`` as its
    ``__module__`` (in reprs, help, pickles): what ``import mesh`` did at once before."""
    from mesh import errors
    from mesh._public import publish

    members = {name: getattr(errors, name) for name in __all__ if hasattr(errors, name)}
    for name, source in _SOURCES.items():
        members[name] = getattr(_importlib.import_module(source), name)
    for name, member in members.items():
        if isinstance(member, type) or callable(member):
            publish(member, __name__)
        globals()[name] = member


def __getattr__(name: str) -> _Any:
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'mesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
