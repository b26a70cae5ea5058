"""Reading policy documents: YAML (or the canonical JSON) to a validated ``Policy``, with every
problem reported as a ``PolicyError`` naming the file, the line, the path in the document and
the problem; the canonical bytes and the JSON Schema of a policy.

Pure: the only I/O is reading the file in ``load_policy``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from mesh._core.policy.model import _UNITS_REQUIRED, API_VERSION, WITH_UNITS, Policy
from mesh.errors import InvalidArgument

SCHEMA_ID = "urn:natsmesh:schema:policy:v1"

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


def line_of(text: str, loc: Sequence[str | int]) -> int | None:
    """The line of ``loc`` (a path in the document, as errors report it) in the policy file
    ``text``, or of its nearest parent that is written; ``None`` for text that is not YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    return _line_of(root, loc)


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


def parse_policy(text: str, source: str = "<string>", *, require_units: bool = False) -> Policy:
    """Parse and validate a policy document (YAML, or JSON such as ``canonical_policy_bytes``).

    Args:
        text: the document.
        source: a file name for error messages.
        require_units: refuse a duration written as a bare number (``timeout: 30``) with the
            fix (``add a unit, e.g. 30s``), as ``load_policy`` does for policy files. Off by
            default, so the canonical form (durations as numbers of seconds) and YAML printed
            from it parse back.

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
        return Policy.model_validate(data, context={_UNITS_REQUIRED: require_units})
    except ValidationError as exc:
        raise _from_validation_error(exc, root, source) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; durations need their unit (``parse_policy`` with
    ``require_units=True``).

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
    return parse_policy(text, source, require_units=True)


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a policy document (as exported to ``schemas/policy.schema.json``)."""
    schema = Policy.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "Mesh policy",
    }


def render_schema() -> str:
    """``policy_schema()`` as written to ``schemas/policy.schema.json`` (pretty, sorted)."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"


def policy_text(policy: Policy) -> str:
    """The policy as YAML a person writes: durations and rates with their units, so the text
    passes ``load_policy`` (and ``mesh-policy validate``/``apply``) and parses back to an equal
    policy."""
    document = policy.model_dump(mode="json", context={WITH_UNITS: True})
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


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
    ).encode("utf-8")
