"""Names for control-plane code: the registry agent and operator tools. Agents use ``mesh``.

Here are the trust root that issues certificates, the control plane's signed documents and
their store in JetStream, the audit chain, enrolment and grace renewal as the registry answers
them, the policy
engine and the canonical form the registry signs, the golden signals agents report, and the
request and reply models of the registry agent's endpoints (``mesh_agents.registry`` serves
them; ``mesh-policy`` calls them).
"""

import inspect as _inspect

from mesh._core.head import Head
from mesh._core.identity import (
    ROOT_KEY_FILE,
    CertificateVerifier,
    TrustRoot,
    load_trust_root,
    save_trust_root,
)
from mesh._core.policy import (
    Decision,
    EndpointPolicy,
    PolicyEngine,
    canonical_policy_bytes,
    diff_policies,
    parse_canonical,
    policy_text,
)
from mesh._core.signals import (
    SIGNALS_TOPIC,
    EdgeReport,
    EdgeStats,
    GraphEdge,
    SignalRow,
    SignalTable,
    TrafficRow,
)
from mesh._public import publish as _publish
from mesh._runtime.control import (
    AuditRecord,
    ControlStore,
    IssuedCertificate,
    JoinToken,
    PolicyRevision,
    Revocation,
    verify_audit_chain,
)
from mesh._runtime.enrol import EnrolmentRequest, serve_enrolment
from mesh._runtime.freshness import HeadKeeper, SavedState
from mesh._runtime.gateway_keys import (
    GATEWAY_KEY_ISSUE,
    GATEWAY_KEY_LIST,
    GATEWAY_KEY_REVOKE,
    GatewayKeyInfo,
    GatewayKeyIssueReply,
    GatewayKeyIssueRequest,
    GatewayKeyList,
    GatewayKeyRevokeReply,
    GatewayKeyRevokeRequest,
    GatewayKeyStore,
)
from mesh._runtime.recovery import GraceRenewal, serve_grace_renewal
from mesh._runtime.registry_api import (
    ADMIN_ROLE,
    DEFAULT_CERT_TTL,
    DENIAL_TOPIC,
    REGISTRY,
    ApplyReply,
    ApplyRequest,
    CertificateReply,
    DenialReport,
    Empty,
    HistoryReply,
    IdentityInfo,
    IdentityList,
    RenewRequest,
    RevisionInfo,
    RevokeReply,
    RevokeRequest,
    RollbackRequest,
    SignalsReply,
    SignalsRequest,
    TokenReply,
    TokenRequest,
)

__all__ = [
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

# Classes and functions name this module, where users import them from (reprs, help, pickles).
for _name in __all__:
    _member = globals()[_name]
    if _inspect.isclass(_member) or _inspect.isfunction(_member):
        _publish(_member, __name__)
del _name, _member
