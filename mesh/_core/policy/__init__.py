"""The policy language (pydantic models of the YAML files) and the authorization engine.

A policy file looks like this (``docs/policy.md`` describes every field)::

    apiVersion: mesh/v1
    kind: Policy
    metadata: {name: research-team}
    spec:
      defaults: {authorization: deny, mode: enforce, timeout: 10s}
      rules:
        - name: planner-may-ask
          allow: {callers: [planner, "role:coordinator"], agent: researcher, endpoints: [answer]}
      endpoints:
        researcher.answer:
          timeout: 30s
          rate_limit: {per_caller: 20/s, total: 200/s, burst: 40}

Evaluation order: deny rules (first match in file order), then allow rules (first match), then
``spec.defaults.authorization``. With no policy installed at all the engine allows everything
(rule ``"no policy"``): the mesh runs open until a policy is applied, like Istio without an
AuthorizationPolicy.

Every problem in a file is reported as a ``PolicyError`` naming the file, the line, the path in
the document and the problem. Pure core: the only I/O is reading the file in ``load_policy``.

The package owns, one idea per module:

- ``model``: the scalars (``parse_duration``, the one duration grammar of the project, and
  ``parse_rate``; name and pattern checks; their schema fragments) and the pydantic models.
- ``load``: ``PolicyError`` and reading documents with file, line and path in every error
  (``parse_policy``, ``parse_canonical``, ``load_policy``), the canonical bytes and the schema.
- ``diff``: ``diff_policies``, what changes between two policies, as lines for people.
- ``engine``: ``Decision``, ``Route`` and ``PolicyEngine`` (compiled rules and traffic routes,
  cached answers).
- ``analyze``: ``analyze_policy``, the agents, endpoints and roles a policy names that no live
  instance has (an ``Inventory`` of the directory), with "did you mean" suggestions.
- ``__main__``: ``python -m mesh._core.policy --export-schema schemas/policy.schema.json``.

Import from the package (``from mesh._core.policy import PolicyEngine``), not the modules.
"""

from mesh._core.policy.analyze import Finding, Inventory, analyze_policy
from mesh._core.policy.diff import diff_policies
from mesh._core.policy.engine import Decision, PolicyEngine, Route
from mesh._core.policy.load import (
    SCHEMA_ID,
    PolicyError,
    canonical_policy_bytes,
    line_of,
    load_policy,
    parse_canonical,
    parse_policy,
    policy_schema,
    policy_text,
    render_schema,
)
from mesh._core.policy.model import (
    API_VERSION,
    Backend,
    CircuitBreakerSpec,
    Defaults,
    EndpointPolicy,
    FaultSpec,
    Match,
    Metadata,
    MirrorSpec,
    OutlierDetectionSpec,
    Policy,
    RateLimitSpec,
    RetrySpec,
    RouteMatch,
    Rule,
    Spec,
    Subset,
    TrafficRoute,
    parse_duration,
    parse_rate,
)

__all__ = [
    "API_VERSION",
    "SCHEMA_ID",
    "Backend",
    "CircuitBreakerSpec",
    "Decision",
    "Defaults",
    "EndpointPolicy",
    "FaultSpec",
    "Finding",
    "Inventory",
    "Match",
    "Metadata",
    "MirrorSpec",
    "OutlierDetectionSpec",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "RateLimitSpec",
    "RetrySpec",
    "Route",
    "RouteMatch",
    "Rule",
    "Spec",
    "Subset",
    "TrafficRoute",
    "analyze_policy",
    "canonical_policy_bytes",
    "diff_policies",
    "line_of",
    "load_policy",
    "parse_canonical",
    "parse_duration",
    "parse_policy",
    "parse_rate",
    "policy_schema",
    "policy_text",
    "render_schema",
]
