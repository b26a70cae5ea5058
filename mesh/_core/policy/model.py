"""The policy language: its scalars (durations, rates, names and patterns, with their JSON
Schema fragments) and the pydantic models of a policy document.

``parse_duration`` is the one duration grammar of the project: policy files and the command-line
tools (``mesh/cli/_common.py``) both use it. Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
    WrapSerializer,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mesh._core.names import validate_name
from mesh.errors import InvalidArgument

API_VERSION = "mesh/v1"

# The validation context key of a policy file: with it set, a duration written as a bare number
# is refused (people write units); without it a number is seconds (the canonical form).
_UNITS_REQUIRED = "units_required"

# --------------------------------------------------------------------------------------------
# Scalars: durations, rates, names and patterns
# --------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BARE_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/(s|m|h)")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_GLOB_CHARS = frozenset("*?[")
_PATTERN_RE = re.compile(r"[a-z0-9_\-*?\[\]!]{1,63}")


def _fail(reason: str, *loc_suffix: str | int) -> PydanticCustomError:
    """A validation error with our own message (no "Value error, " prefix); ``loc_suffix``
    extends the location pydantic reports, so the error points at the offending field."""
    return PydanticCustomError("policy", "{reason}", {"reason": reason, "loc_suffix": loc_suffix})


def _positive_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _bare_number(value: object) -> float | None:
    """``value`` as a number when it is one without a unit (``30``, ``0.5`` or ``"30"``)."""
    number = _positive_number(value)
    if number is None and isinstance(value, str) and _BARE_NUMBER_RE.fullmatch(value.strip()):
        number = float(value)
    return number


def parse_duration(value: object, *, bare_seconds: bool = True) -> float:
    """A duration as float seconds: ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"`` or ``"7d"``.

    A number and a unit, with no space between them. A string without a unit (``"30"``) is
    refused with the fix (``add a unit, e.g. 30s``). A number that is not a string (YAML ``30``,
    JSON ``30.0``) is seconds when ``bare_seconds`` is true, as in the canonical form
    (``canonical_policy_bytes`` writes durations as numbers of seconds); policy files pass
    ``bare_seconds=False``, so it is refused there the same way.

    Raises:
        InvalidArgument: anything else, and any duration that is not > 0.
    """
    seconds = _positive_number(value) if bare_seconds else None
    if seconds is None and isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is not None:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        bare = _bare_number(value)
        if bare is not None:
            example = f"{bare:g}s" if math.isfinite(bare) and bare > 0 else "30s"
            raise InvalidArgument(f"invalid duration {value!r}: add a unit, e.g. {example}")
        raise InvalidArgument(
            f"invalid duration {value!r}: use a number and a unit (ms, s, m, h or d), "
            "e.g. 250ms, 10s, 5m, 1h, 7d"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"invalid duration {value!r}: must be greater than 0")
    return seconds


def parse_rate(value: object) -> float:
    """A rate as float events per second: ``"20/s"``, ``"600/m"``, ``"1000/h"`` or a number
    (per second).

    Raises:
        InvalidArgument: anything else, and any rate that is not > 0.
    """
    rate = _positive_number(value)
    if rate is None and isinstance(value, str):
        m = _RATE_RE.fullmatch(value.strip())
        if m is not None:
            rate = float(m.group(1)) / _RATE_UNITS[m.group(2)]
    if rate is None:
        raise InvalidArgument(
            f"invalid rate {value!r}: use N/s, N/m or N/h (e.g. 20/s) or a number per second"
        )
    if not math.isfinite(rate) or rate <= 0:
        raise InvalidArgument(f"invalid rate {value!r}: must be greater than 0")
    return rate


def format_duration(seconds: float) -> str:
    """A duration as a policy file writes it (``10s``, ``250ms``, ``5m``, ``7d``); it parses
    back to exactly ``seconds`` (the number itself where no written form would)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    for text in (f"{seconds * 1000:.0f}ms", f"{seconds!r}s"):
        if _DURATION_RE.fullmatch(text) and parse_duration(text) == seconds:
            return text
    return repr(seconds)


def format_rate(rate: float) -> str:
    """A rate as a policy file writes it (``20/s``); it parses back to exactly ``rate``."""
    text = f"{int(rate)}/s" if rate.is_integer() else f"{rate!r}/s"
    return text if _RATE_RE.fullmatch(text) else repr(rate)


WITH_UNITS = "with_units"
"""Serialization context key: write durations and rates with their units (``policy_text``);
without it they are numbers, as in the canonical form that is signed."""


def _written(
    format: Callable[[float], str],
) -> Callable[[float, SerializerFunctionWrapHandler, SerializationInfo], Any]:
    def serialize(
        value: float, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        context = info.context if isinstance(info.context, dict) else {}
        return format(value) if context.get(WITH_UNITS) else handler(value)

    return serialize


def _as_field(parse: Callable[[object], float]) -> Callable[[object], float]:
    def validate(value: object) -> float:
        try:
            return parse(value)
        except InvalidArgument as exc:
            raise _fail(exc.message) from None

    return validate


def _duration_field(value: object, info: ValidationInfo) -> float:
    """``parse_duration`` as a field validator: a bare number is seconds, unless the document is
    validated with ``{_UNITS_REQUIRED: True}`` in its context (a policy file)."""
    context = info.context if isinstance(info.context, dict) else {}
    try:
        return parse_duration(value, bare_seconds=not context.get(_UNITS_REQUIRED, False))
    except InvalidArgument as exc:
        raise _fail(exc.message) from None


def _is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def _check_pattern(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(f"expected a {kind} name or pattern (a string), got {value!r}")
    if _is_glob(value):
        if not _PATTERN_RE.fullmatch(value):
            raise _fail(
                f"invalid {kind} pattern {value!r}: use a-z, 0-9, '-', '_' and the wildcards "
                "*, ? and [...]"
            )
        return value
    try:
        return validate_name(kind, value)
    except InvalidArgument as exc:
        raise _fail(exc.message) from None


def _check_caller(value: object) -> str:
    if isinstance(value, str) and value.startswith("role:"):
        _check_pattern("role", value[5:])
        return value
    return _check_pattern("agent", value)


def _check_plain_name(kind: str) -> Callable[[object], str]:
    def validate(value: object) -> str:
        if not isinstance(value, str):
            raise _fail(f"expected a {kind} name (a string), got {value!r}")
        try:
            return validate_name(kind, value)
        except InvalidArgument as exc:
            raise _fail(exc.message) from None

    return validate


def _check_endpoint_key(value: object) -> str:
    if not isinstance(value, str) or value.count(".") != 1:
        raise _fail(
            f"invalid endpoint key {value!r}: use <agent>.<endpoint>, e.g. researcher.answer "
            "(wildcards allowed in either part)"
        )
    agent, endpoint = value.split(".")
    _check_pattern("agent", agent)
    _check_pattern("endpoint", endpoint)
    return value


_NAME_SCHEMA = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"}
_PATTERN_SCHEMA = {"type": "string", "pattern": r"^[a-z0-9_\-*?\[\]!]{1,63}$"}

Duration = Annotated[
    float,
    BeforeValidator(_duration_field),
    WrapSerializer(_written(format_duration), when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": (
                "a duration with its unit: 250ms, 10s, 5m, 1h, 7d (> 0); a plain number of "
                "seconds only in the canonical form"
            ),
        }
    ),
]
"""Seconds; written as ``250ms``, ``10s``, ``5m``, ``1h`` or ``7d`` (a number in the canonical
form)."""

Rate = Annotated[
    float,
    BeforeValidator(_as_field(parse_rate)),
    WrapSerializer(_written(format_rate), when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?/(s|m|h)$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": "a rate: N/s, N/m, N/h, or a number per second (> 0)",
        }
    ),
]
"""Events per second; written as ``20/s``, ``600/m``, ``1000/h`` or a number."""

RuleName = Annotated[str, BeforeValidator(_check_plain_name("rule")), WithJsonSchema(_NAME_SCHEMA)]
PolicyName = Annotated[
    str, BeforeValidator(_check_plain_name("policy")), WithJsonSchema(_NAME_SCHEMA)
]
CallerPattern = Annotated[
    str,
    BeforeValidator(_check_caller),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(role:)?[a-z0-9_\-*?\[\]!]{1,63}$",
            "description": "an agent name or glob, or role:<role> (glob allowed in the role)",
        }
    ),
]
AgentPattern = Annotated[
    str, BeforeValidator(lambda v: _check_pattern("agent", v)), WithJsonSchema(_PATTERN_SCHEMA)
]
EndpointPattern = Annotated[
    str,
    BeforeValidator(lambda v: _check_pattern("endpoint", v)),
    WithJsonSchema(_PATTERN_SCHEMA),
]
EndpointKey = Annotated[
    str,
    BeforeValidator(_check_endpoint_key),
    WithJsonSchema(
        {"type": "string", "pattern": r"^[a-z0-9_\-*?\[\]!]{1,63}\.[a-z0-9_\-*?\[\]!]{1,63}$"}
    ),
]

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Model):
    """Who the policy is: a name (like an agent name) and a free-text description."""

    name: PolicyName
    description: str = ""


class Defaults(_Model):
    """What applies when no rule matches, and settings for every endpoint."""

    authorization: Literal["allow", "deny"] = Field(
        "deny", description="the decision when no rule matches"
    )
    mode: Literal["enforce", "audit"] = Field(
        "enforce", description="audit: would-be denials are allowed and reported"
    )
    timeout: Duration | None = Field(
        None, description="request timeout for endpoints without their own"
    )
    access_log: StrictBool = Field(False, description="one log line per request")


def _check_origin(value: object) -> str:
    """An origin pattern: an agent name or glob, or ``kind:name`` of an external principal
    (a glob allowed in the name: ``user:*``)."""
    if isinstance(value, str) and ":" in value:
        kind, _, name = value.partition(":")
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,15}", kind) or not re.fullmatch(
            r"[A-Za-z0-9_.@+*?\-]{1,128}", name
        ):
            raise _fail(f"origin {value!r} must be an agent pattern or kind:name (user:alice)")
        return value
    return _check_pattern("agent", value)


OriginPattern = Annotated[
    str,
    BeforeValidator(_check_origin),
    WithJsonSchema(
        {
            "type": "string",
            "description": "an agent name or glob, or kind:name of an external principal "
            "(user:alice, user:*)",
        }
    ),
]
ScopeName = Annotated[
    str,
    BeforeValidator(lambda v: _check_scope(v)),
    WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.:-]{0,62}$"}),
]


def _check_scope(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.:-]{0,62}", value):
        raise _fail(f"scope {value!r} must match [a-z0-9][a-z0-9_.:-]{{0,62}}")
    return value


_CHAIN_FIELDS = ("origins", "via", "max_depth", "scopes")


class Match(_Model):
    """Which calls a rule is about: callers, the callee agent and its endpoints, and, for
    calls made on someone's behalf, their delegation chain (``docs/delegation.md``)."""

    callers: tuple[CallerPattern, ...] = Field(
        min_length=1, description="agent names or globs, or role:<role>"
    )
    agent: AgentPattern = Field("*", description="the callee agent name or glob")
    endpoints: tuple[EndpointPattern, ...] = Field(
        ("*",), min_length=1, description="endpoint names or globs"
    )
    origins: tuple[OriginPattern, ...] | None = Field(
        None,
        min_length=1,
        description="who the work is for (the chain's origin; a direct call's origin is its "
        "caller): agent names or globs, or kind:name of an external principal",
    )
    via: tuple[AgentPattern, ...] | None = Field(
        None,
        min_length=1,
        description="agents the call must have come through (each must be in the chain's path)",
    )
    max_depth: StrictInt | None = Field(
        None, ge=1, description="hops from the origin at most (a direct call is 1)"
    )
    scopes: tuple[ScopeName, ...] | None = Field(
        None, min_length=1, description="scopes the chain must carry, all of them"
    )

    @property
    def on_chain(self) -> bool:
        """Whether the rule looks at the delegation chain."""
        return any(getattr(self, name) is not None for name in _CHAIN_FIELDS)

    @model_serializer(mode="wrap")
    def _omit_unset_chain_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Rules that do not look at chains keep their canonical bytes.
        out: dict[str, Any] = handler(self)
        for name in _CHAIN_FIELDS:
            if getattr(self, name) is None:
                out.pop(name, None)
        return out


class DelegationSpec(_Model):
    """Limits of delegation chains, checked by every callee before its handler runs."""

    max_depth: StrictInt = Field(
        8, ge=1, le=32, description="hops from the origin a call may be (a direct call is 1)"
    )
    reentrant: tuple[AgentPattern, ...] = Field(
        (),
        description="agents a chain may come back to (A → B → A); any other loop is refused",
    )


class Rule(_Model):
    """A named rule with exactly one of ``allow`` or ``deny``."""

    name: RuleName
    allow: Match | None = None
    deny: Match | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_both(cls, data: Any) -> Any:
        # Before field validation, so "both" is reported even when a block has other errors;
        # it points at whichever of the two comes second in the file.
        if isinstance(data, dict):
            given = [k for k in data if k in ("allow", "deny") and data[k] is not None]
            if len(given) > 1:
                raise _fail("exactly one of allow or deny is required, not both", given[-1])
        return data

    @model_validator(mode="after")
    def _one(self) -> Rule:
        # After field validation, so a misspelt "alow:" is reported as an unknown field.
        if self.allow is None and self.deny is None:
            raise _fail("exactly one of allow or deny is required")
        return self

    @property
    def effect(self) -> Literal["allow", "deny"]:
        """``"allow"`` or ``"deny"``."""
        return "allow" if self.allow is not None else "deny"

    @property
    def match(self) -> Match:
        """The ``allow`` or ``deny`` block, whichever is set."""
        m = self.allow if self.allow is not None else self.deny
        assert m is not None  # guaranteed by validation
        return m


class RetrySpec(_Model):
    """Retries of retryable failures (idempotent endpoints or keyed requests only)."""

    attempts: StrictInt = Field(ge=1, le=10, description="total attempts including the first")
    per_try_timeout: Duration | None = Field(None, description="limit of one attempt")


class RateLimitSpec(_Model):
    """Token buckets at the callee: one per (caller, endpoint) and one per endpoint."""

    per_caller: Rate | None = Field(None, description="rate for each caller")
    total: Rate | None = Field(None, description="rate shared by all callers")
    burst: StrictInt | None = Field(
        None, ge=1, description="per-caller bucket size (default: max(1, ceil(per_caller)))"
    )
    total_burst: StrictInt | None = Field(
        None, ge=1, description="shared bucket size (default: max(1, ceil(total)))"
    )
    per_origin: Rate | None = Field(
        None,
        description="rate for each origin of a delegation chain (a direct call's origin is its "
        "caller), whichever agents the calls come through",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RateLimitSpec:
        if self.per_caller is None and self.total is None and self.per_origin is None:
            raise _fail("a rate limit needs per_caller, total, per_origin or several")
        if self.burst is not None and self.per_caller is None:
            raise _fail("burst sizes the per_caller bucket; use total_burst with total", "burst")
        if self.total_burst is not None and self.total is None:
            raise _fail("total_burst needs total", "total_burst")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_origin_rate(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Limits without per_origin keep their canonical bytes.
        out: dict[str, Any] = handler(self)
        if self.per_origin is None:
            out.pop("per_origin", None)
        return out

    @property
    def origin_burst(self) -> int:
        """Size of each per-origin bucket (0 when there is no per-origin limit)."""
        return 0 if self.per_origin is None else max(1, math.ceil(self.per_origin))

    @property
    def caller_burst(self) -> int:
        """Effective size of each per-caller bucket (0 when there is no per-caller limit)."""
        if self.per_caller is None:
            return 0
        return self.burst if self.burst is not None else max(1, math.ceil(self.per_caller))

    @property
    def total_capacity(self) -> int:
        """Effective size of the shared bucket (0 when there is no total limit)."""
        if self.total is None:
            return 0
        return self.total_burst if self.total_burst is not None else max(1, math.ceil(self.total))


def _percent(value: object) -> float:
    number = _positive_number(value)
    if number is None or not math.isfinite(number) or not 0 <= number <= 100:
        raise _fail(f"invalid percentage {value!r}: use a number from 0 to 100")
    return number


def _literal_start(pattern: str) -> str:
    """What every version a glob matches begins with: its text before the first wildcard."""
    return re.split(r"[*?\[]", pattern, maxsplit=1)[0]


@functools.lru_cache(maxsize=256)
def _version_glob(pattern: str) -> Callable[[str], object]:
    """A matcher of versions against ``pattern`` (a glob, or a plain version that matches only
    itself), compiled once: ``Subset.matches`` runs on every attempt of a split call."""
    if not _is_glob(pattern):
        return lambda version: False  # equal versions were compared before
    return re.compile(fnmatch.translate(pattern)).match


def _check_version(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise _fail(f"invalid version {value!r}: use the version string agents announce")
    return value


Percent = Annotated[
    float,
    BeforeValidator(_percent),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 100}),
]
"""A percentage of requests, 0 to 100."""

VersionPattern = Annotated[
    str,
    BeforeValidator(_check_version),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 64}),
]
"""An agent version as its instances announce it (``2.0.0``), or a glob (``2.*``)."""

KeyName = Annotated[str, BeforeValidator(_check_plain_name("key")), WithJsonSchema(_NAME_SCHEMA)]
AgentName = Annotated[
    str, BeforeValidator(_check_plain_name("agent")), WithJsonSchema(_NAME_SCHEMA)
]

LoadBalancer = Literal["least_outstanding", "peak_ewma"]
AbortCode = Literal[  # the error codes of mesh.errors (a test keeps the two the same)
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "CANCELLED",
]


class CircuitBreakerSpec(_Model):
    """Fail fast while a destination keeps failing, and bound what waits on it (Envoy's
    circuit-breaker thresholds, Hystrix's closed, open and half-open states)."""

    consecutive_failures: StrictInt = Field(
        5, ge=1, le=10_000, description="failures in a row that open the circuit"
    )
    open_for: Duration = Field(
        1.0, description="how long the circuit first stays open; doubled at each reopening"
    )
    max_open_for: Duration = Field(60.0, description="the longest the circuit stays open")
    max_concurrent: StrictInt | None = Field(
        None, ge=1, description="attempts in flight to the destination at once (none: no limit)"
    )
    max_pending: StrictInt | None = Field(
        None,
        ge=0,
        description="calls that may wait for one of max_concurrent's slots (default 1024)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CircuitBreakerSpec:
        if self.max_open_for < self.open_for:
            raise _fail("max_open_for must not be shorter than open_for", "max_open_for")
        if self.max_pending is not None and self.max_concurrent is None:
            raise _fail("max_pending needs max_concurrent", "max_pending")
        return self


class OutlierDetectionSpec(_Model):
    """Eject an instance that keeps failing from the caller's balancing, for a while (Envoy's
    outlier detection, Istio's ``outlierDetection``)."""

    consecutive_failures: StrictInt = Field(
        5, ge=1, le=10_000, description="failures in a row that eject an instance"
    )
    base_ejection_time: Duration = Field(
        30.0, description="ejection time, times the number of times the instance was ejected"
    )
    max_ejection_time: Duration = Field(300.0, description="the longest one ejection lasts")
    max_ejection_percent: Percent = Field(
        10.0, description="the most instances ejected at once, in per cent (at least one)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> OutlierDetectionSpec:
        if self.max_ejection_time < self.base_ejection_time:
            raise _fail(
                "max_ejection_time must not be shorter than base_ejection_time",
                "max_ejection_time",
            )
        return self


_NEWER_ENDPOINT_FIELDS = ("max_queue", "circuit_breaker", "outlier_detection", "load_balancer")


class EndpointPolicy(_Model):
    """Traffic settings for the endpoints one ``<agent>.<endpoint>`` key matches."""

    timeout: Duration | None = Field(None, description="request timeout")
    retries: RetrySpec | None = None
    rate_limit: RateLimitSpec | None = None
    max_queue: StrictInt | None = Field(
        None,
        ge=0,
        description="requests that may wait for a concurrency slot; more are refused at once "
        "with RESOURCE_EXHAUSTED and a retry-after (default 1024; 0: no queue)",
    )
    access_log: StrictBool | None = Field(None, description="overrides defaults.access_log")
    circuit_breaker: CircuitBreakerSpec | None = None
    outlier_detection: OutlierDetectionSpec | None = None
    load_balancer: LoadBalancer | None = Field(
        None,
        description="how callers choose an instance: least_outstanding (default) or peak_ewma",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_newer_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A policy that does not set a field added after the first release keeps the canonical
        # bytes (and signatures) it had before the field existed, and stays readable by agents
        # that do not know it.
        out: dict[str, Any] = handler(self)
        for name in _NEWER_ENDPOINT_FIELDS:
            if getattr(self, name) is None:
                out.pop(name, None)
        return out


class Subset(_Model):
    """Instances of the callee chosen by the version and labels their signed directory records
    announce; an instance is in the subset when it matches all that is given."""

    version: VersionPattern | None = Field(None, description="a version or a glob (2.*)")
    labels: dict[KeyName, str] = Field(default_factory=dict, description="labels, all required")

    def matches(self, version: str, labels: Mapping[str, str]) -> bool:
        """Whether an instance announcing ``version`` and ``labels`` is in the subset."""
        want = self.version
        if want is not None and want != version and not _version_glob(want)(version):
            return False
        return not self.labels or all(labels.get(k) == v for k, v in self.labels.items())

    def may_overlap(self, other: Subset) -> bool:
        """Whether some instance could be in both subsets: versions that can match one version
        (equal, or one a glob the other matches; two globs unless their literal beginnings
        differ, as ``1.*`` and ``2.*`` do) and no label given different values."""
        a, b = self.version, other.version
        if a is not None and b is not None and a != b:
            if not _is_glob(a) and not _is_glob(b):
                return False
            if not _is_glob(a) and not fnmatch.fnmatchcase(a, b):
                return False
            if not _is_glob(b) and not fnmatch.fnmatchcase(b, a):
                return False
            pa, pb = _literal_start(a), _literal_start(b)
            if not (pa.startswith(pb) or pb.startswith(pa)):
                return False
        return all(other.labels.get(k, v) == v for k, v in self.labels.items())

    def describe(self) -> str:
        """``version 2.0.0``, ``labels track=canary`` or both (labels sorted)."""
        parts = [] if self.version is None else [f"version {self.version}"]
        if self.labels:
            pairs = sorted(self.labels.items())
            parts.append("labels " + ",".join(f"{k}={v}" for k, v in pairs))
        return " ".join(parts) or "any instance"


class Backend(Subset):
    """One weighted part of a split."""

    weight: StrictInt = Field(ge=0, le=100, description="per cent of the route's calls")

    @model_validator(mode="after")
    def _names_a_subset(self) -> Backend:
        if self.version is None and not self.labels:
            raise _fail("a split backend needs a version, labels or both")
        return self


class MirrorSpec(Subset):
    """A copy of some calls for a shadow: sealed to it, its reply discarded."""

    agent: AgentName = Field(description="the shadow agent (the route's own with a version)")
    percent: Percent = Field(100.0, description="per cent of the route's calls copied")


class FaultDelay(_Model):
    """Hold some calls before sending them."""

    percent: Percent = Field(description="per cent of the route's calls delayed")
    fixed: Duration = Field(description="how long")


class FaultAbort(_Model):
    """Fail some calls at once with an error code, without sending them."""

    percent: Percent = Field(description="per cent of the route's calls aborted")
    code: AbortCode = Field(description="the error code callers see")


class FaultSpec(_Model):
    """Faults injected into a route's calls, to test how callers cope (Istio's ``fault``)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _one(self) -> FaultSpec:
        if self.delay is None and self.abort is None:
            raise _fail("a fault needs a delay, an abort or both")
        return self


class RouteMatch(_Model):
    """Which calls a route is about: callers, the callee agent, its endpoints and the request
    metadata the caller set (every key given must have the value given)."""

    callers: tuple[CallerPattern, ...] = Field(
        ("*",), min_length=1, description="agent names or globs, or role:<role>"
    )
    agent: AgentName = Field(description="the callee agent")
    endpoints: tuple[EndpointPattern, ...] = Field(
        ("*",), min_length=1, description="endpoint names or globs"
    )
    metadata: dict[KeyName, str] = Field(
        default_factory=dict, description="request metadata keys and their exact values"
    )


class TrafficRoute(_Model):
    """Where and how a matching call goes: a weighted split over versions or labels, affinity,
    its own timeout and retries, a mirror and injected faults (Istio's ``VirtualService``
    HTTP routes). The first route that matches a call applies."""

    name: RuleName
    match: RouteMatch
    split: tuple[Backend, ...] = Field(
        (), description="weighted backends; weights sum to 100 (none: any instance)"
    )
    hash_on: str | None = Field(
        None,
        description="affinity: calls with the same value stay on one instance while it lives; "
        "idempotency_key, or metadata.<key>",
    )
    timeout: Duration | None = Field(None, description="request timeout of the route's calls")
    retries: RetrySpec | None = None
    mirror: MirrorSpec | None = None
    fault: FaultSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrafficRoute:
        if self.split:
            total = sum(b.weight for b in self.split)
            if total != 100:
                weights = " + ".join(str(b.weight) for b in self.split)
                raise _fail(f"split weights must sum to 100, not {weights} = {total}", "split")
            seen: set[str] = set()
            for i, b in enumerate(self.split):
                what = b.describe()
                if what in seen:
                    raise _fail(f"split names {what} twice", "split", i)
                seen.add(what)
        if self.hash_on is not None and not (
            self.hash_on == "idempotency_key"
            or (self.hash_on.startswith("metadata.") and _is_name(self.hash_on[9:]))
        ):
            raise _fail(
                f"invalid hash_on {self.hash_on!r}: use idempotency_key or metadata.<key>",
                "hash_on",
            )
        mirror = self.mirror
        if mirror is not None and mirror.agent == self.match.agent:
            if mirror.version is None and not mirror.labels:
                raise _fail(
                    f"the mirror is the route's own agent {mirror.agent!r}: name another agent, "
                    "or the version or labels of a shadow deployment",
                    "mirror",
                )
            if not self.split:
                raise _fail(
                    f"the mirror ({mirror.describe()}) is part of the route's own agent, which "
                    "takes the route's live calls on every instance: add a split that sends "
                    "none to it, or mirror to another agent",
                    "mirror",
                )
            for b in self.split:
                if b.weight > 0 and mirror.may_overlap(b):
                    raise _fail(
                        f"the mirror ({mirror.describe()}) may take live calls from the split's "
                        f"{b.describe()}: mirror to a shadow deployment the split does not use",
                        "mirror",
                    )
        return self


def _is_name(value: str) -> bool:
    try:
        validate_name("key", value)
    except InvalidArgument:
        return False
    return True


class Spec(_Model):
    """Defaults, authorization rules (in file order) and endpoint settings."""

    defaults: Defaults = Defaults()
    rules: tuple[Rule, ...] = ()
    endpoints: dict[EndpointKey, EndpointPolicy] = Field(default_factory=dict)
    routes: tuple[TrafficRoute, ...] = Field(
        (), description="traffic routes, in file order: the first that matches a call applies"
    )
    delegation: DelegationSpec | None = Field(
        None, description="limits of delegation chains (default: depth 8, no re-entry)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Spec:
        for field_name, kind in (("rules", "rule"), ("routes", "route")):
            seen: dict[str, int] = {}
            for i, item in enumerate(getattr(self, field_name)):
                if item.name in seen:
                    first = seen[item.name]
                    raise _fail(
                        f"duplicate {kind} name {item.name!r} (first used by "
                        f"spec.{field_name}[{first}])",
                        field_name,
                        i,
                        "name",
                    )
                seen[item.name] = i
        return self

    @model_serializer(mode="wrap")
    def _omit_no_routes(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A policy without routes keeps the canonical bytes it had before routes existed.
        out: dict[str, Any] = handler(self)
        if not self.routes:
            out.pop("routes", None)
        if self.delegation is None:
            out.pop("delegation", None)
        return out


class Policy(_Model):
    """A mesh policy document (``apiVersion: mesh/v1``, ``kind: Policy``)."""

    apiVersion: Literal["mesh/v1"] = Field(  # the YAML field name, so model_dump has it
        title="apiVersion", description="the policy language version"
    )
    kind: Literal["Policy"] = Field(title="kind", description="always Policy")
    metadata: Metadata
    spec: Spec
