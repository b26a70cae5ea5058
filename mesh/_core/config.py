"""Configuration as small frozen value objects. Only the CLI and the runner read the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mesh._core.names import validate_name
from mesh._core.schemas import is_schema_hash
from mesh.errors import InvalidArgument

__all__ = ["DirectoryConfig", "Limits", "MeshConfig", "RetryPolicy", "Timeouts"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Time limits, in seconds.

    Attributes:
        request: default deadline of a call when the caller gives none.
        connect: connecting to NATS and waiting for readiness.
        drain: how long a draining agent lets in-flight handlers finish.
        replay_window: how long a message stays acceptable after its timestamp.
        max_future: how far ahead of the receiver's clock a message's timestamp may be (the
            senders' clock skew). Small, because it bounds how far a flood of future-dated
            messages can lift a replay floor (``docs/protocol.md`` section 15).
        head_refresh: how often a registry signs a new head when nothing changed.
        head_ttl: how long a head is valid; an agent whose newest head is older is stale,
            and a broker can hide newer state from an agent for at most this long unnoticed.
        renewal_grace: read by the registry: how long after its expiry a certificate may
            still be renewed, with proof of its private key (``docs/protocol.md`` section
            29). Past it the agent needs a new join token. ``0`` turns the grace path off.
        claim_window: how long an idempotency claim (``MeshConfig.claims``) is kept: a keyed
            call repeated within it is answered with the first execution's outcome, on any
            instance. The max age of the claims bucket; read when the bucket is created.
        credit_wait: how long a streaming handler waits for the caller's credit before it is
            stopped: a caller that vanished (or stopped reading) frees it within this.
    """

    request: float = 10.0
    connect: float = 10.0
    drain: float = 10.0
    replay_window: float = 60.0
    max_future: float = 5.0
    head_refresh: float = 15.0
    head_ttl: float = 120.0
    renewal_grace: float = 7 * 24 * 3600.0
    claim_window: float = 24 * 3600.0
    credit_wait: float = 30.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how failed attempts are retried (only retryable failures, only for idempotent
    endpoints or requests with an idempotency key, or when nothing was sent because no instance
    was live; never past the deadline).

    Attributes:
        attempts: total attempts including the first.
        per_try_timeout: limit of one attempt; ``None`` lets an attempt use the whole deadline.
        backoff_base / backoff_cap: full-jitter exponential backoff (Envoy: 25 ms, 250 ms).
        budget_ratio / budget_min_per_s / budget_ttl: the retry budget (Linkerd: 20 %, 10/s, 10 s).
    """

    attempts: int = 3
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_cap: float = 0.250
    budget_ratio: float = 0.2
    budget_min_per_s: float = 10.0
    budget_ttl: float = 10.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Size and concurrency limits.

    Attributes:
        max_body: largest request or reply body in bytes, checked before sending and before
            decrypting.
        endpoint_concurrency: default number of handlers one endpoint runs at once.
        reply_cache_ttl: how long replies are kept by idempotency key.
        seen_cache: message ids a replay guard keeps (one guard per instance for requests,
            one per event subscription).
    """

    max_body: int = 1024 * 1024 - 20 * 1024  # so a full frame fits NATS's default 1 MiB
    endpoint_concurrency: int = 64
    reply_cache_ttl: float = 120.0
    seen_cache: int = 100_000


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """The JetStream KV directory.

    Attributes:
        heartbeat: seconds between record refreshes.
        ttl: a record older than this is treated as a dead instance.
        drain_grace: after deregistering, how long a draining instance keeps its subscription
            so callers see the change before it stops listening.
        scope: ``called``: watch the records and beats of the agents this mesh calls, each
            from its first call (its own agent from its first claim), so N agents cost each
            what their callees send;
            ``all``: watch every agent from the start (tools that list the mesh).
    """

    heartbeat: float = 1.0
    ttl: float = 4.0
    drain_grace: float = 0.3
    scope: Literal["called", "all"] = "called"

    def __post_init__(self) -> None:
        if self.scope not in ("called", "all"):
            raise InvalidArgument(
                f"DirectoryConfig.scope must be 'called' or 'all', not {self.scope!r}"
            )


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Everything a ``Mesh`` connection needs besides its identity.

    Attributes:
        servers: NATS URLs.
        prefix: subject prefix, so several meshes can share one NATS.
        access_log: write one JSON line per served request (policy can also switch it on).
        signals_interval: seconds between golden-signal reports to the registry (0: never).
        services: answer the NATS services protocol (``$SRV.PING|INFO|STATS``) so NATS
            tooling lists agents; the replies reveal names, versions and request counts.
        state_dir: where the agent keeps the newest signed head and policy it accepted, so
            that after a restart it refuses older state (``mesh-agent run`` uses the identity
            directory). ``None`` keeps nothing: a restarted agent trusts any unexpired head.
        replicas: JetStream replicas of the stores (directory, control plane, audit) the mesh
            creates; ``None``: 3 when the server is in a cluster of three or more servers,
            else 1. An existing store with fewer is scaled up when opened (never down).
        allow_no_policy: start with no policy (everything allowed) when the mesh has no
            signed head: no registry has run, or someone deleted the head. On in the library
            (embedded meshes, tests and the quickstart run without a registry); ``mesh-agent
            run``, how agents are deployed, turns it off unless ``--allow-no-policy``. Off, an
            agent waits for the registry's head and refuses to start without one (fail
            closed). Either way an agent whose ``state_dir`` holds a head never starts on less.
        claims: make keyed calls to non-idempotent endpoints run at most once across all
            instances of the callee: a signed claim per (caller, endpoint, key) in the
            replicated bucket ``<prefix>-claims``, written before the handler runs and
            updated with its sealed outcome (``docs/protocol.md`` section 17). Costs two
            JetStream writes per keyed non-idempotent call; ``False`` keeps only the
            per-instance reply cache.
        delegation: start a delegation chain on every call this mesh makes that does not
            already carry one (``docs/delegation.md``): callees, and the calls their handlers
            make in turn, then know this agent as the origin. Costs one Ed25519 signature
            per call here and a verification per new link at each callee. Off, a chain
            starts only where a call asks (``delegate=``); a chain received is always
            carried on by the handler's nested calls.
        schema_pins: endpoint schema hashes this caller pins, keyed ``"agent.endpoint"``
            (``{"researcher.answer": "sha256:..."}``, the hashes ``Mesh.schemas`` and
            ``mesh-policy schemas`` print): a call to a pinned endpoint is refused with
            ``FailedPrecondition``, before anything is sent, by an instance whose signed
            directory record announces another hash (or none), until the pin is changed.
        caller_checks: decide each call's authorization in the caller too, before sending: a
            denied call fails at once and costs no round trip, but no callee sees it, so no
            denial is reported to the audit log. ``False``: only the callee decides (it always
            does), and reports every denial with the caller and the origin; the HTTP gateway
            runs so, so that every refusal of an external principal is audited.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    prefix: str = "mesh"
    services: bool = True
    access_log: bool = False
    signals_interval: float = 5.0
    state_dir: str | None = None
    allow_no_policy: bool = True
    replicas: int | None = None
    claims: bool = True
    delegation: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limits: Limits = field(default_factory=Limits)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    schema_pins: Mapping[str, str] = field(default_factory=dict, hash=False)
    caller_checks: bool = True

    def __post_init__(self) -> None:
        validate_name("subject prefix", self.prefix)
        # A copy: the caller's dict may change later, the configuration may not.
        object.__setattr__(self, "schema_pins", _checked_pins(self.schema_pins))
        if self.timeouts.claim_window <= 0:
            raise InvalidArgument("Timeouts.claim_window must be positive")
        if self.timeouts.renewal_grace < 0:
            raise InvalidArgument("Timeouts.renewal_grace must not be negative")
        if not self.servers:
            raise InvalidArgument("MeshConfig.servers is empty: give at least one NATS URL")


def _checked_pins(pins: Mapping[str, str]) -> dict[str, str]:
    """``MeshConfig.schema_pins`` checked: ``agent.endpoint`` keys, ``sha256:<hex>`` values.

    Raises:
        InvalidArgument: naming the offending pin.
    """
    checked: dict[str, str] = {}
    for key, value in pins.items():
        agent, dot, endpoint = key.partition(".") if isinstance(key, str) else ("", "", "")
        if not dot:
            raise InvalidArgument(f"schema pin {key!r}: key must be agent.endpoint")
        validate_name("agent", agent)
        validate_name("endpoint", endpoint)
        if not is_schema_hash(value):
            raise InvalidArgument(
                f"schema pin {key!r}: {value!r} is not a schema hash (sha256: and 64 lowercase "
                "hex digits, as mesh-policy schemas prints it)"
            )
        checked[key] = value
    return checked
