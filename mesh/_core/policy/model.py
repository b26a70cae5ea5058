"""The policy language: its scalars (durations, rates, names and patterns, with their JSON
Schema fragments) and the pydantic models of a policy document.

``parse_duration`` is the one duration grammar of the project: policy files and the command-line
tools (``mesh/cli/_common.py``) both use it. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
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


class Match(_Model):
    """Which calls a rule is about: callers, the callee agent and its endpoints."""

    callers: tuple[CallerPattern, ...] = Field(
        min_length=1, description="agent names or globs, or role:<role>"
    )
    agent: AgentPattern = Field("*", description="the callee agent name or glob")
    endpoints: tuple[EndpointPattern, ...] = Field(
        ("*",), min_length=1, description="endpoint names or globs"
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

    @model_validator(mode="after")
    def _consistent(self) -> RateLimitSpec:
        if self.per_caller is None and self.total is None:
            raise _fail("a rate limit needs per_caller, total or both")
        if self.burst is not None and self.per_caller is None:
            raise _fail("burst sizes the per_caller bucket; use total_burst with total", "burst")
        if self.total_burst is not None and self.total is None:
            raise _fail("total_burst needs total", "total_burst")
        return self

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

    @model_serializer(mode="wrap")
    def _omit_unset_max_queue(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A policy that does not set max_queue keeps the canonical bytes (and signatures) it
        # had before the field existed, and stays readable by agents that do not know it.
        out: dict[str, Any] = handler(self)
        if self.max_queue is None:
            out.pop("max_queue", None)
        return out


class Spec(_Model):
    """Defaults, authorization rules (in file order) and endpoint settings."""

    defaults: Defaults = Defaults()
    rules: tuple[Rule, ...] = ()
    endpoints: dict[EndpointKey, EndpointPolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Spec:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                first = seen[rule.name]
                raise _fail(
                    f"duplicate rule name {rule.name!r} (first used by spec.rules[{first}])",
                    "rules",
                    i,
                    "name",
                )
            seen[rule.name] = i
        return self


class Policy(_Model):
    """A mesh policy document (``apiVersion: mesh/v1``, ``kind: Policy``)."""

    apiVersion: Literal["mesh/v1"] = Field(  # the YAML field name, so model_dump has it
        title="apiVersion", description="the policy language version"
    )
    kind: Literal["Policy"] = Field(title="kind", description="always Policy")
    metadata: Metadata
    spec: Spec
