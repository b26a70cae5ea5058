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
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mesh._core.identity import validate_name
from mesh.errors import InvalidArgument

__all__ = [
    "API_VERSION",
    "SCHEMA_ID",
    "Decision",
    "Defaults",
    "EndpointPolicy",
    "Match",
    "Metadata",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "RateLimitSpec",
    "RetrySpec",
    "Rule",
    "Spec",
    "canonical_policy_bytes",
    "diff_policies",
    "load_policy",
    "parse_duration",
    "parse_policy",
    "parse_rate",
    "policy_schema",
    "render_schema",
]

API_VERSION = "mesh/v1"
SCHEMA_ID = "urn:natsmesh:schema:policy:v1"

_CACHE_MAX = 10_000

# --------------------------------------------------------------------------------------------
# Scalars: durations, rates, names and patterns
# --------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
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


def parse_duration(value: object) -> float:
    """A duration as float seconds: ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"`` or a number of
    seconds.

    Raises:
        InvalidArgument: anything else, and any duration that is not > 0.
    """
    seconds = _positive_number(value)
    if seconds is None and isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is not None:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        raise InvalidArgument(
            f"invalid duration {value!r}: use e.g. 250ms, 10s, 5m, 1h or a number of seconds"
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


def _as_field(parse: Callable[[object], float]) -> Callable[[object], float]:
    def validate(value: object) -> float:
        try:
            return parse(value)
        except InvalidArgument as exc:
            raise _fail(exc.message) from None

    return validate


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
    BeforeValidator(_as_field(parse_duration)),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": "a duration: 250ms, 10s, 5m, 1h, or a number of seconds (> 0)",
        }
    ),
]
"""Seconds; written as ``250ms``, ``10s``, ``5m``, ``1h`` or a number."""

Rate = Annotated[
    float,
    BeforeValidator(_as_field(parse_rate)),
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
    access_log: StrictBool | None = Field(None, description="overrides defaults.access_log")


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


# --------------------------------------------------------------------------------------------
# Errors with file, line and path
# --------------------------------------------------------------------------------------------


class PolicyError(InvalidArgument):
    """A policy file is invalid.

    Attributes:
        source: the file name as given, or ``"<string>"``.
        line: 1-based line of the problem, or ``None`` when unknown (missing or empty file).
        path: where in the document, e.g. ``spec.rules[1].allow.callers`` (``""`` for the whole
            document).
        problem: what is wrong.
        errors: every problem found (this error first); the message shows the first and says
            how many more there are.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str = "<string>",
        line: int | None = None,
        path: str = "",
        errors: Sequence[PolicyError] = (),
    ) -> None:
        self.source = source
        self.line = line
        self.path = path
        self.problem = problem
        self.errors: list[PolicyError] = [self, *errors]
        message = self.location_text()
        if errors:
            message += f" (and {len(errors)} more)"
        super().__init__(message)

    def location_text(self) -> str:
        """``source:line: path: problem`` for this one problem (omitting unknown parts)."""
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.problem}" if self.path else f"{where}: {self.problem}"

    def __str__(self) -> str:
        return self.message

    @classmethod
    def collect(cls, errors: Sequence[PolicyError]) -> PolicyError:
        """One error carrying ``errors`` (at least one) as its ``.errors`` list."""
        first = errors[0]
        return cls(
            first.problem,
            source=first.source,
            line=first.line,
            path=first.path,
            errors=list(errors[1:]),
        )


_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _format_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _mark_line(node: yaml.Node | None) -> int | None:
    return None if node is None else int(node.start_mark.line) + 1


def _line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The line of the YAML node at ``loc``, or of the nearest parent that exists.

    For a mapping entry the key's line is used (the line that names the field)."""
    node = root
    line = _mark_line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and str(key_node.value) == str(part):
                    line = _mark_line(key_node)
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return line
            node = node.value[part]
            line = _mark_line(node)
        else:
            return line
    return line


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _fields_at(loc: Sequence[str | int]) -> list[str] | None:
    """Field names the model at ``loc`` accepts (for "did you mean" hints)."""
    tp: Any = Policy
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _problem(err: Mapping[str, Any], loc: Sequence[str | int]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "policy":
        return str(err["msg"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        allowed = _fields_at(loc[:-1]) or []
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "expected one of " + ", ".join(allowed)
        return f"unknown field {name!r} ({hint})" if allowed else f"unknown field {name!r}"
    if kind == "too_short":
        return "must not be empty" if value in ((), []) else str(err["msg"])
    msg = _PLAIN_TYPES.get(kind) or str(err["msg"])
    if isinstance(value, str | int | float | bool) or value is None:
        msg += f" (got {value!r})"
    return msg


_PLAIN_TYPES = {
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
}


def _is_noise(err: Mapping[str, Any], all_errors: Sequence[Mapping[str, Any]]) -> bool:
    """A "too short" error on a list whose items already failed says nothing new."""
    if err["type"] != "too_short":
        return False
    loc = tuple(err["loc"])
    return any(
        len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc
        for other in all_errors
    )


def _from_validation_error(
    exc: ValidationError, root: yaml.Node | None, source: str
) -> PolicyError:
    found: list[PolicyError] = []
    errors = exc.errors(include_url=False)
    for err in errors:
        if _is_noise(err, errors):
            continue
        loc: list[str | int] = [p for p in err["loc"] if p != "[key]"]
        ctx = err.get("ctx") or {}
        loc.extend(ctx.get("loc_suffix", ()))
        found.append(
            PolicyError(
                _problem(err, loc),
                source=source,
                line=_line_of(root, loc),
                path=_format_path(loc),
            )
        )
    found.sort(key=lambda e: e.line or 0)
    return PolicyError.collect(found)


def _path_at_syntax_error(text: str) -> str:
    """The document path being parsed when a YAML syntax error stopped the parser."""
    # frames: ["map", key, state] (state: key | value | in-value) or ["seq", index]
    stack: list[list[Any]] = []
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                stack.pop()
                if stack and stack[-1][0] == "map" and stack[-1][2] == "in-value":
                    stack[-1][2] = "key"
                continue
            if not isinstance(ev, yaml.NodeEvent):
                continue
            collection = isinstance(ev, yaml.CollectionStartEvent)
            if stack:
                top = stack[-1]
                if top[0] == "seq":
                    top[1] += 1
                elif top[2] == "key":
                    top[1] = ev.value if isinstance(ev, yaml.ScalarEvent) else None
                    top[2] = "value"
                    if not collection:
                        continue
                else:
                    top[2] = "in-value" if collection else "key"
            if isinstance(ev, yaml.MappingStartEvent):
                stack.append(["map", None, "key"])
            elif isinstance(ev, yaml.SequenceStartEvent):
                stack.append(["seq", -1])
    except yaml.YAMLError:
        pass
    loc: list[str | int] = []
    for frame in stack:
        if frame[0] == "seq":
            if frame[1] >= 0:
                loc.append(frame[1])
        elif frame[2] != "key" and frame[1] is not None:
            loc.append(str(frame[1]))
    return _format_path(loc)


def _syntax_error(exc: yaml.YAMLError, text: str, source: str) -> PolicyError:
    line: int | None = None
    problem = str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else int(mark.line) + 1
        problem = exc.problem or problem
        if exc.context:
            ctx_mark = exc.context_mark
            where = "" if ctx_mark is None else f" at line {int(ctx_mark.line) + 1}"
            problem += f" ({exc.context}{where})"
    elif isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        problem = f"unacceptable character #x{exc.character:04x}"
    return PolicyError(
        f"invalid YAML: {problem}",
        source=source,
        line=line,
        path=_path_at_syntax_error(text),
    )


def _duplicate_keys(node: yaml.Node, loc: list[str | int], source: str) -> list[PolicyError]:
    out: list[PolicyError] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int | None] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                out.append(
                    PolicyError(
                        f"duplicate key {key!r} (first at line {seen[key]})",
                        source=source,
                        line=_mark_line(key_node),
                        path=_format_path([*loc, key]),
                    )
                )
            elif key is not None:
                seen[key] = _mark_line(key_node)
            out.extend(_duplicate_keys(value_node, [*loc, key or "?"], source))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.extend(_duplicate_keys(item, [*loc, i], source))
    return out


def parse_canonical(data: bytes, source: str = "<string>") -> Policy:
    """Parse a policy in its canonical JSON form (``canonical_policy_bytes``), as distributed.

    About 60 times faster than ``parse_policy``, which keeps YAML positions for its error
    messages: agents parse every revision, so this is what policy propagation costs.

    Raises:
        PolicyError: as ``parse_policy`` reports it, when the document is not valid.
    """
    try:
        return Policy.model_validate_json(data)
    except ValidationError:
        return parse_policy(data.decode("utf-8", errors="replace"), source)  # located errors


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate a policy document (YAML, or JSON such as ``canonical_policy_bytes``).

    Args:
        text: the document.
        source: a file name for error messages.

    Raises:
        PolicyError: naming the source, line, path and problem; ``.errors`` lists them all.
    """
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # unprintable characters are refused up front
        raise _syntax_error(exc, text, source) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text, source) from None
        if root is None:
            raise PolicyError(
                f"the document is empty: expected a Policy (apiVersion: {API_VERSION}, "
                "kind: Policy, metadata, spec)",
                source=source,
            )
        if not isinstance(root, yaml.MappingNode):
            raise PolicyError(
                "expected a mapping (apiVersion, kind, metadata, spec) at the top level",
                source=source,
                line=_mark_line(root),
            )
        dups = _duplicate_keys(root, [], source)
        if dups:
            raise PolicyError.collect(dups)
        try:
            data = loader.construct_document(root)
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text, source) from None
    finally:
        loader.dispose()
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, root, source) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: the file is missing or unreadable, or the policy is invalid.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError("no such file", source=source) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"not UTF-8 text: {exc.reason}", source=source) from None
    except OSError as exc:
        raise PolicyError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    return parse_policy(text, source)


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a policy document (as exported to ``schemas/policy.schema.json``)."""
    schema = Policy.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "Mesh policy",
    }


def canonical_policy_bytes(policy: Policy) -> bytes:
    """Stable bytes of a policy (compact JSON, sorted keys), for signing and comparing.

    Durations and rates appear as numbers (seconds, per second); ``parse_policy`` reads the
    bytes back to an equal ``Policy``.
    """
    return json.dumps(
        policy.model_dump(mode="json"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "none"
    return f"{rate:g}/s"


def _rule_summary(rule: Rule) -> str:
    m = rule.match
    return (
        f"{rule.effect} callers=[{', '.join(m.callers)}] agent={m.agent} "
        f"endpoints=[{', '.join(m.endpoints)}]"
    )


def _endpoint_fields(ep: EndpointPolicy) -> dict[str, str]:
    out: dict[str, str] = {}
    if ep.timeout is not None:
        out["timeout"] = _fmt_duration(ep.timeout)
    if ep.retries is not None:
        out["retries.attempts"] = str(ep.retries.attempts)
        if ep.retries.per_try_timeout is not None:
            out["retries.per_try_timeout"] = _fmt_duration(ep.retries.per_try_timeout)
    if ep.rate_limit is not None:
        rl = ep.rate_limit
        if rl.per_caller is not None:
            out["rate_limit.per_caller"] = _fmt_rate(rl.per_caller)
            out["rate_limit.burst"] = str(rl.caller_burst)
        if rl.total is not None:
            out["rate_limit.total"] = _fmt_rate(rl.total)
            out["rate_limit.total_burst"] = str(rl.total_capacity)
    if ep.access_log is not None:
        out["access_log"] = str(ep.access_log).lower()
    return out


def _defaults_fields(d: Defaults) -> dict[str, str]:
    return {
        "authorization": d.authorization,
        "mode": d.mode,
        "timeout": _fmt_duration(d.timeout),
        "access_log": str(d.access_log).lower(),
    }


def _changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, "none"), new.get(key, "none")
        if a != b:
            out.append(f"{key} {a} -> {b}")
    return out


def diff_policies(old: Policy | None, new: Policy) -> list[str]:
    """What changes when ``new`` replaces ``old``, as human-readable lines (empty: no change).

    Rules are matched by name, endpoint settings by key. ``old=None`` (no policy installed yet)
    lists everything in ``new`` as added.
    """
    lines: list[str] = []
    if old is None:
        lines.append(f'policy "{new.metadata.name}" (no policy installed before)')
        d = _defaults_fields(new.spec.defaults)
        lines.append("defaults: " + " ".join(f"{k}={v}" for k, v in d.items()))
        old_rules: dict[str, Rule] = {}
        old_eps: dict[str, EndpointPolicy] = {}
    else:
        if old.metadata.name != new.metadata.name:
            lines.append(f"metadata.name {old.metadata.name} -> {new.metadata.name}")
        if old.metadata.description != new.metadata.description:
            lines.append(
                f"metadata.description {old.metadata.description!r} -> {new.metadata.description!r}"
            )
        lines += [
            f"defaults.{c}"
            for c in _changes(
                _defaults_fields(old.spec.defaults), _defaults_fields(new.spec.defaults)
            )
        ]
        old_rules = {r.name: r for r in old.spec.rules}
        old_eps = dict(old.spec.endpoints)
    new_rules = {r.name: r for r in new.spec.rules}
    for name, rule in new_rules.items():
        before = old_rules.get(name)
        if before is None:
            lines.append(f'rule "{name}" added: {_rule_summary(rule)}')
        elif before != rule:
            lines.append(f'rule "{name}" changed: {_rule_summary(before)} -> {_rule_summary(rule)}')
    lines += [f'rule "{name}" removed' for name in old_rules if name not in new_rules]
    common_old = [n for n in old_rules if n in new_rules]
    common_new = [n for n in new_rules if n in old_rules]
    if common_old != common_new:
        lines.append(f"rule order changed: {', '.join(common_old)} -> {', '.join(common_new)}")
    for key, ep in new.spec.endpoints.items():
        prev = old_eps.get(key)
        if prev is None:
            fields = " ".join(f"{k}={v}" for k, v in _endpoint_fields(ep).items())
            lines.append(f"endpoint {key} added: {fields or '(no settings)'}")
        elif prev != ep:
            changes = _changes(_endpoint_fields(prev), _endpoint_fields(ep))
            lines.append(f"endpoint {key} changed: {'; '.join(changes)}")
    lines += [f"endpoint {key} removed" for key in old_eps if key not in new.spec.endpoints]
    return lines


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------

_DEFAULT_RULES = frozenset({"default deny", "default allow", "no policy"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization check.

    Attributes:
        allowed: whether the call may proceed (False only for a deny in enforce mode).
        rule: the deciding rule's name, or ``"default deny"``, ``"default allow"`` or
            ``"no policy"``.
        effect: what the policy says: ``"allow"`` or ``"deny"``.
        audit_only: a denial that audit mode let through (log and count it).
    """

    allowed: bool
    rule: str
    effect: Literal["allow", "deny"]
    audit_only: bool

    def explain(self, source: str | None = None, revision: int | None = None) -> str:
        """One line for people, e.g. ``ALLOW by rule "planner-may-ask" (policies/x.yaml,
        revision 7)`` or ``ALLOW (audit mode; would DENY by default deny; revision 3)``."""
        context = ", ".join(
            p for p in (source, None if revision is None else f"revision {revision}") if p
        )
        if self.rule == "no policy":
            return "ALLOW (no policy installed" + (f"; {context})" if context else ")")
        by = self.rule if self.rule in _DEFAULT_RULES else f'rule "{self.rule}"'
        if self.audit_only:
            return f"ALLOW (audit mode; would DENY by {by}" + (f"; {context})" if context else ")")
        verb = "ALLOW" if self.allowed else "DENY"
        return f"{verb} by {by}" + (f" ({context})" if context else "")


class _Names:
    """A compiled set of name patterns: exact names by set lookup, globs by one regex."""

    __slots__ = ("any", "exact", "regex")

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = list(patterns)
        self.any = "*" in pats
        self.exact = frozenset(p for p in pats if not _is_glob(p))
        globs = [p for p in pats if _is_glob(p) and p != "*"]
        self.regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globs)) if globs else None
        )

    def matches(self, name: str) -> bool:
        return (
            self.any
            or name in self.exact
            or (self.regex is not None and self.regex.match(name) is not None)
        )

    @property
    def empty(self) -> bool:
        return not self.any and not self.exact and self.regex is None


class _CompiledRule:
    __slots__ = ("agent", "endpoints", "name", "names", "roles")

    def __init__(self, rule: Rule) -> None:
        m = rule.match
        self.name = rule.name
        self.names = _Names(c for c in m.callers if not c.startswith("role:"))
        self.roles = _Names(c[5:] for c in m.callers if c.startswith("role:"))
        self.agent = _Names([m.agent])
        self.endpoints = _Names(m.endpoints)

    def matches(self, caller: str, roles: tuple[str, ...], callee: str, endpoint: str) -> bool:
        if not (self.agent.matches(callee) and self.endpoints.matches(endpoint)):
            return False
        if self.names.matches(caller):
            return True
        return not self.roles.empty and any(self.roles.matches(r) for r in roles)


def _specificity(key: str, index: int) -> tuple[bool, bool, int, int]:
    agent, endpoint = key.split(".")
    literal = sum(1 for c in key if c not in "*?[]!")
    return (not _is_glob(agent), not _is_glob(endpoint), literal, -index)


_MISS = object()


class PolicyEngine:
    """Answers "may this caller call that endpoint?" and "what are this endpoint's settings?".

    Args:
        policy: the installed policy; ``None`` means none is installed yet, and everything is
            allowed (rule ``"no policy"``): the mesh runs open until a policy is applied, like
            Istio without an AuthorizationPolicy.
        revision: the registry's revision number of the policy, for explanations.
        source: where the policy came from (a file name), for explanations.

    Decisions and endpoint settings are cached per input (bounded; the cache is emptied when
    full), so a repeated call costs about one dict lookup.
    """

    def __init__(
        self, policy: Policy | None, *, revision: int | None = None, source: str | None = None
    ) -> None:
        self._policy = policy
        self._revision = revision
        self._source = source
        self._decisions: dict[tuple[str, tuple[str, ...], str, str], Decision] = {}
        self._settings: dict[tuple[str, str], EndpointPolicy | None] = {}
        if policy is None:
            self._deny: list[_CompiledRule] = []
            self._allow: list[_CompiledRule] = []
            self._endpoints: list[tuple[_Names, _Names, EndpointPolicy]] = []
            self._default = Decision(True, "no policy", "allow", False)
            self._audit = False
            return
        spec = policy.spec
        self._audit = spec.defaults.mode == "audit"
        self._deny = [_CompiledRule(r) for r in spec.rules if r.deny is not None]
        self._allow = [_CompiledRule(r) for r in spec.rules if r.allow is not None]
        self._default = self._verdict(
            f"default {spec.defaults.authorization}", spec.defaults.authorization
        )
        ranked = sorted(
            enumerate(spec.endpoints.items()),
            key=lambda item: _specificity(item[1][0], item[0]),
            reverse=True,
        )
        self._endpoints = []
        for _i, (key, ep) in ranked:
            agent, endpoint = key.split(".")
            self._endpoints.append((_Names([agent]), _Names([endpoint]), ep))

    def _verdict(self, rule: str, effect: Literal["allow", "deny"]) -> Decision:
        if effect == "allow":
            return Decision(True, rule, "allow", False)
        return Decision(self._audit, rule, "deny", self._audit)

    @property
    def policy(self) -> Policy | None:
        """The installed policy (``None``: none yet)."""
        return self._policy

    @property
    def revision(self) -> int | None:
        return self._revision

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def mode(self) -> Literal["enforce", "audit"]:
        """``"audit"`` when denials are only reported; ``"enforce"`` otherwise (also with no
        policy)."""
        return "audit" if self._audit else "enforce"

    def decide(
        self, caller_agent: str, caller_roles: tuple[str, ...], callee_agent: str, endpoint: str
    ) -> Decision:
        """Decide one call: deny rules first (first match in file order), then allow rules,
        then the default.

        Args:
            caller_agent: the verified caller's agent name.
            caller_roles: the roles in the caller's certificate.
            callee_agent: the agent called.
            endpoint: the endpoint called.
        """
        key = (caller_agent, caller_roles, callee_agent, endpoint)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        decision = self._evaluate(caller_agent, caller_roles, callee_agent, endpoint)
        if len(self._decisions) >= _CACHE_MAX:
            self._decisions.clear()
        self._decisions[key] = decision
        return decision

    def _evaluate(
        self, caller: str, roles: tuple[str, ...], callee: str, endpoint: str
    ) -> Decision:
        for rule in self._deny:
            if rule.matches(caller, roles, callee, endpoint):
                return self._verdict(rule.name, "deny")
        for rule in self._allow:
            if rule.matches(caller, roles, callee, endpoint):
                return self._verdict(rule.name, "allow")
        return self._default

    def explain(
        self, caller_agent: str, caller_roles: tuple[str, ...], callee_agent: str, endpoint: str
    ) -> str:
        """``decide(...)`` as one line naming the rule, the source and the revision."""
        d = self.decide(caller_agent, caller_roles, callee_agent, endpoint)
        return d.explain(self._source, self._revision)

    def endpoint_settings(self, agent: str, endpoint: str) -> EndpointPolicy | None:
        """The settings of the most specific ``spec.endpoints`` key matching ``agent.endpoint``.

        Specificity: an exact agent part beats a glob, then an exact endpoint part beats a glob,
        then the key with more literal (non-wildcard) characters, then the earlier key in the
        file. Settings are not merged across keys: the winner's settings apply alone.
        """
        key = (agent, endpoint)
        hit = self._settings.get(key, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        found: EndpointPolicy | None = None
        for agents, endpoints, ep in self._endpoints:
            if agents.matches(agent) and endpoints.matches(endpoint):
                found = ep
                break
        if len(self._settings) >= _CACHE_MAX:
            self._settings.clear()
        self._settings[key] = found
        return found

    def timeout_for(self, agent: str, endpoint: str) -> float | None:
        """The endpoint's timeout, else ``defaults.timeout``, else ``None`` (the caller's own
        default applies)."""
        ep = self.endpoint_settings(agent, endpoint)
        if ep is not None and ep.timeout is not None:
            return ep.timeout
        return None if self._policy is None else self._policy.spec.defaults.timeout


# --------------------------------------------------------------------------------------------
# python -m mesh.policy --export-schema schemas/policy.schema.json
# --------------------------------------------------------------------------------------------


def render_schema() -> str:
    """``policy_schema()`` as written to ``schemas/policy.schema.json`` (pretty, sorted)."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.policy")
    parser.add_argument(
        "--export-schema", metavar="PATH", required=True, help="write the policy JSON Schema"
    )
    args = parser.parse_args(argv)
    Path(args.export_schema).write_text(render_schema(), encoding="utf-8")
    print(f"wrote {args.export_schema}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
