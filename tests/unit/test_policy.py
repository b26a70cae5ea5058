"""Unit tests for mesh.policy: the policy language, its error reports and the decision engine."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import ValidationError

import mesh._core.policy as policy_mod
import mesh._core.policy.engine as engine_mod
from mesh._core.policy import (
    Decision,
    Policy,
    PolicyEngine,
    PolicyError,
    Route,
    canonical_policy_bytes,
    diff_policies,
    load_policy,
    parse_duration,
    parse_policy,
    parse_rate,
    policy_schema,
    policy_text,
)
from mesh._core.policy.model import Metadata, format_duration, format_rate
from mesh.cli._common import parse_duration as cli_parse_duration
from mesh.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
BROKEN = POLICIES / "broken"

HEADER = "apiVersion: mesh/v1\nkind: Policy\nmetadata: {name: test}\n"


def doc(spec: str) -> str:
    """A policy document with ``spec`` (indented YAML under ``spec:``)."""
    return HEADER + "spec:\n" + spec


def policy_of(spec: dict[str, Any], name: str = "test") -> Policy:
    return Policy.model_validate(
        {"apiVersion": "mesh/v1", "kind": "Policy", "metadata": {"name": name}, "spec": spec}
    )


def error_of(text: str, source: str = "p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    return info.value


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class TestParsing:
    def test_research_policy_every_field(self) -> None:
        """The demo policy parses into the values its YAML spells."""
        p = load_policy(POLICIES / "research.yaml")

        assert (p.apiVersion, p.kind, p.metadata.name) == ("mesh/v1", "Policy", "research-team")
        assert p.metadata.description.startswith("Planner asks")
        d = p.spec.defaults
        assert (d.authorization, d.mode, d.timeout, d.access_log) == (
            "deny",
            "enforce",
            10.0,
            False,
        )
        assert [r.name for r in p.spec.rules] == [
            "nobody-deletes",
            "planner-may-ask",
            "researcher-may-look-up",
        ]
        deny = p.spec.rules[0]
        assert deny.effect == "deny" and deny.allow is None and deny.deny is not None
        assert (deny.match.callers, deny.match.agent, deny.match.endpoints) == (
            ("*",),
            "librarian",
            ("delete*",),
        )
        ask = p.spec.rules[1]
        assert ask.effect == "allow"
        assert ask.match.callers == ("planner", "role:coordinator")
        ep = p.spec.endpoints["researcher.answer"]
        assert ep.timeout == 30.0
        assert ep.retries is not None
        assert (ep.retries.attempts, ep.retries.per_try_timeout) == (3, 10.0)
        rl = ep.rate_limit
        assert rl is not None
        assert (rl.per_caller, rl.total, rl.burst, rl.total_burst) == (20.0, 200.0, 40, None)
        assert (rl.caller_burst, rl.total_capacity) == (40, 200)
        assert ep.access_log is None

    def test_open_policy(self) -> None:
        """open.yaml allows everything in audit mode, with no rules."""
        p = load_policy(POLICIES / "open.yaml")

        assert p.spec.defaults.authorization == "allow"
        assert p.spec.defaults.mode == "audit"
        assert p.spec.rules == () and p.spec.endpoints == {}

    def test_defaults_when_omitted(self) -> None:
        """An empty spec means default deny, enforce, no timeout, no access log, no rules."""
        p = parse_policy(HEADER + "spec: {}\n")

        d = p.spec.defaults
        assert (d.authorization, d.mode, d.timeout, d.access_log) == (
            "deny",
            "enforce",
            None,
            False,
        )
        assert p.spec.rules == () and p.spec.endpoints == {}
        assert p.metadata.description == ""

    def test_match_defaults(self) -> None:
        """A rule's agent defaults to ``*`` and its endpoints to ``["*"]``."""
        p = parse_policy(doc("  rules:\n    - {name: r, allow: {callers: [a]}}\n"))

        assert (p.spec.rules[0].match.agent, p.spec.rules[0].match.endpoints) == ("*", ("*",))

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("250ms", 0.25),
            ("10s", 10.0),
            ("1.5s", 1.5),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1d", 86400.0),
            ("7d", 604800.0),
            (2, 2.0),
            (0.5, 0.5),
        ],
    )
    def test_durations(self, text: object, seconds: float) -> None:
        """Durations are ms/s/m/h/d strings or (the canonical form) numbers of seconds."""
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        "text",
        ["0s", "0ms", 0, -1, "10", "10 seconds", "10 s", "1w", "s", True, None, float("inf")],
    )
    def test_bad_durations(self, text: object) -> None:
        """Zero, negative, unitless strings, unknown units and non-numbers are refused."""
        with pytest.raises(InvalidArgument, match="invalid duration"):
            parse_duration(text)

    @pytest.mark.parametrize(("text", "fix"), [("30", "30s"), (30, "30s"), (0.5, "0.5s")])
    def test_bare_number_needs_a_unit(self, text: object, fix: str) -> None:
        """A number without a unit (a string, or any number with ``bare_seconds=False``) is
        refused with the fix."""
        with pytest.raises(InvalidArgument) as info:
            parse_duration(text, bare_seconds=False)

        assert info.value.message == f"invalid duration {text!r}: add a unit, e.g. {fix}"

    def test_cli_durations_use_the_policy_grammar(self) -> None:
        """The command-line tools parse ``7d`` like policy files do."""
        assert cli_parse_duration("7d") == parse_duration("7d") == 604800.0

    @pytest.mark.parametrize("text", ["30", "10 seconds", "0s"])
    def test_cli_refuses_bad_durations_as_invalid_argument(self, text: str) -> None:
        """The command-line tools refuse a bare number too, with the same ``InvalidArgument``."""
        with pytest.raises(InvalidArgument) as info:
            cli_parse_duration(text)

        assert type(info.value) is InvalidArgument
        with pytest.raises(InvalidArgument) as core:
            parse_duration(text)
        assert info.value.message == core.value.message

    @pytest.mark.parametrize(
        ("text", "per_second"),
        [("20/s", 20.0), ("600/m", 10.0), ("3600/h", 1.0), ("0.5/s", 0.5), (5, 5.0)],
    )
    def test_rates(self, text: object, per_second: float) -> None:
        """Rates are N/s, N/m, N/h or a number per second."""
        assert parse_rate(text) == pytest.approx(per_second)

    @pytest.mark.parametrize("text", ["0/s", "5/x", "5", "/s", -1, 0, True, "5/d"])
    def test_bad_rates(self, text: object) -> None:
        with pytest.raises(InvalidArgument, match="invalid rate"):
            parse_rate(text)

    @pytest.mark.parametrize(
        ("limit", "caller_burst", "total_capacity"),
        [
            ({"per_caller": "2.5/s"}, 3, 0),
            ({"per_caller": "30/m"}, 1, 0),
            ({"total": "100/s"}, 0, 100),
            ({"per_caller": 5, "burst": 9, "total": 50, "total_burst": 60}, 9, 60),
        ],
    )
    def test_burst_defaults(
        self, limit: dict[str, Any], caller_burst: int, total_capacity: int
    ) -> None:
        """Bucket sizes default to max(1, ceil(rate)); burst and total_burst override them."""
        p = policy_of({"endpoints": {"a.b": {"rate_limit": limit}}})

        rl = p.spec.endpoints["a.b"].rate_limit
        assert rl is not None
        assert (rl.caller_burst, rl.total_capacity) == (caller_burst, total_capacity)

    def test_models_are_frozen(self) -> None:
        p = load_policy(POLICIES / "research.yaml")

        with pytest.raises(ValidationError):
            p.spec.defaults.mode = "audit"  # type: ignore[misc]

    def test_canonical_bytes_are_stable_and_parse_back(self) -> None:
        """Canonical bytes: compact JSON, sorted keys, equal for equal policies; they parse back
        (as JSON is YAML) to an equal policy."""
        a = load_policy(POLICIES / "research.yaml")
        b = parse_policy((POLICIES / "research.yaml").read_text())

        raw = canonical_policy_bytes(a)
        assert raw == canonical_policy_bytes(b)
        data = json.loads(raw)
        assert list(data) == sorted(data)
        assert raw == json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        assert parse_policy(raw.decode()) == a

    def test_canonical_bytes_keep_unicode(self) -> None:
        p = parse_policy(
            "apiVersion: mesh/v1\nkind: Policy\n"
            "metadata: {name: x, description: café ☕}\nspec: {}\n"
        )

        raw = canonical_policy_bytes(p)
        assert "café ☕".encode() in raw
        assert parse_policy(raw.decode()) == p

    def test_canonical_bytes_normalise_spelling(self) -> None:
        """``30s`` and ``30`` and ``0.5m`` are the same policy, byte for byte."""
        a = parse_policy(doc("  defaults: {timeout: 30s}\n"))
        b = parse_policy(doc("  defaults: {timeout: 30}\n"))
        c = parse_policy(doc("  defaults: {timeout: 0.5m}\n"))

        assert canonical_policy_bytes(a) == canonical_policy_bytes(b) == canonical_policy_bytes(c)

    def test_schema_has_id_and_title(self) -> None:
        schema = policy_schema()

        assert schema["$id"] == policy_mod.SCHEMA_ID
        assert schema["title"] == "Mesh policy"
        assert schema["required"] == ["apiVersion", "kind", "metadata", "spec"]

    def test_schema_numbers_must_be_greater_than_zero(self) -> None:
        """As in the parser, a duration or rate written as a number must be > 0 (0.5 is)."""
        validator = Draft202012Validator(policy_schema())
        text = doc(
            "  defaults: {timeout: 500ms}\n  endpoints:\n    a.b: {rate_limit: {total: 30/m}}\n"
        )
        p = parse_policy(text)
        data = json.loads(canonical_policy_bytes(p))
        assert data["spec"]["defaults"]["timeout"] == 0.5
        assert data["spec"]["endpoints"]["a.b"]["rate_limit"]["total"] == 0.5

        assert list(validator.iter_errors(data)) == []
        data["spec"]["defaults"]["timeout"] = 0
        data["spec"]["endpoints"]["a.b"]["rate_limit"]["total"] = 0
        assert [e.json_path for e in validator.iter_errors(data)] == [
            "$.spec.defaults.timeout",
            "$.spec.endpoints['a.b'].rate_limit",
        ]

    def test_without_a_context_a_bare_number_is_seconds(self) -> None:
        """Validated with no context (as canonical JSON is), a bare number is seconds."""
        p = policy_of({"defaults": {"timeout": 30}, "endpoints": {"a.b": {"timeout": 0.5}}})

        assert p.spec.defaults.timeout == 30.0
        assert p.spec.endpoints["a.b"].timeout == 0.5
        assert Policy.model_validate_json(canonical_policy_bytes(p)) == p

    def test_policy_text_keeps_the_field_order(self) -> None:
        """``policy_text`` writes fields in the models' order (name before allow), not sorted."""
        text = policy_text(parse_policy(doc("  rules:\n    - {name: r, allow: {callers: [a]}}\n")))

        assert (
            "  defaults:\n"
            "    authorization: deny\n"
            "    mode: enforce\n"
            "    timeout: null\n"
            "    access_log: false\n"
            "  rules:\n"
            "  - name: r\n"
            "    allow:\n"
            "      callers:\n"
            "      - a\n"
            "      agent: '*'\n"
        ) in text

    def test_policy_text_keeps_unicode(self) -> None:
        """A description with non-ASCII characters is written as those characters."""
        p = parse_policy(
            "apiVersion: mesh/v1\nkind: Policy\n"
            "metadata: {name: x, description: café ☕}\nspec: {}\n"
        )

        assert "  description: café ☕\n" in policy_text(p)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize(
        ("name", "line", "path", "problem"),
        [
            (
                "syntax-error.yaml",
                11,
                "spec.rules[0].allow.callers[1]",
                "invalid YAML: expected ',' or ']'",
            ),
            (
                "unknown-field.yaml",
                12,
                "spec.rules[0].allow.endpoint",
                "unknown field 'endpoint' (did you mean 'endpoints'?)",
            ),
            (
                "allow-and-deny.yaml",
                12,
                "spec.rules[1].deny",
                "exactly one of allow or deny is required, not both",
            ),
            (
                "bad-duration.yaml",
                11,
                'spec.endpoints["researcher.answer"].timeout',
                "invalid duration '30 seconds'",
            ),
        ],
    )
    def test_broken_files(self, name: str, line: int, path: str, problem: str) -> None:
        """Each broken example names its file, line, path and problem."""
        source = str(BROKEN / name)
        with pytest.raises(PolicyError) as info:
            load_policy(source)

        err = info.value
        assert (err.source, err.line, err.path) == (source, line, path)
        assert problem in err.problem
        assert str(err) == err.message == f"{source}:{line}: {path}: {err.problem}"
        assert err.errors == [err]
        assert err.code == "INVALID_ARGUMENT"
        assert isinstance(err, InvalidArgument)

    def test_every_broken_file_is_covered(self) -> None:
        assert sorted(p.name for p in BROKEN.glob("*.yaml")) == [
            "allow-and-deny.yaml",
            "bad-duration.yaml",
            "syntax-error.yaml",
            "unknown-field.yaml",
        ]

    def test_bare_number_in_a_policy_file(self, tmp_path: Path) -> None:
        """A duration without a unit in a file names the file, the line and the fix."""
        f = tmp_path / "p.yaml"
        f.write_text(doc("  defaults:\n    timeout: 30\n"))

        with pytest.raises(PolicyError) as info:
            load_policy(f)

        err = info.value
        assert (err.source, err.line, err.path) == (str(f), 6, "spec.defaults.timeout")
        assert (
            str(err) == f"{f}:6: spec.defaults.timeout: invalid duration 30: add a unit, e.g. 30s"
        )

    def test_missing_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.yaml"
        with pytest.raises(PolicyError) as info:
            load_policy(missing)

        assert info.value.source == str(missing)
        assert info.value.line is None
        assert str(info.value) == f"{missing}: no such file"

    def test_not_utf8(self, tmp_path: Path) -> None:
        f = tmp_path / "bin.yaml"
        f.write_bytes(b"\xff\xfe\x00junk")

        with pytest.raises(PolicyError, match="not UTF-8"):
            load_policy(f)

    @pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n"])
    def test_empty_document(self, text: str) -> None:
        err = error_of(text)

        assert err.line is None and err.path == ""
        assert str(err).startswith("p.yaml: the document is empty")

    def test_default_source(self) -> None:
        with pytest.raises(PolicyError) as info:
            parse_policy("")

        assert info.value.source == "<string>"
        assert str(info.value).startswith("<string>: ")

    def test_top_level_not_a_mapping(self) -> None:
        err = error_of("\n- a\n- b\n")

        assert (err.line, err.path) == (2, "")
        assert "expected a mapping" in err.problem

    @pytest.mark.parametrize(
        ("text", "line", "path", "problem"),
        [
            (
                "apiVersion: mesh/v2\nkind: Policy\nmetadata: {name: x}\nspec: {}\n",
                1,
                "apiVersion",
                "Input should be 'mesh/v1' (got 'mesh/v2')",
            ),
            (
                "apiVersion: mesh/v1\nkind: Polisy\nmetadata: {name: x}\nspec: {}\n",
                2,
                "kind",
                "Input should be 'Policy' (got 'Polisy')",
            ),
        ],
    )
    def test_wrong_api_version_or_kind(self, text: str, line: int, path: str, problem: str) -> None:
        err = error_of(text)

        assert (err.line, err.path, err.problem) == (line, path, problem)

    def test_missing_fields_point_at_the_parent(self) -> None:
        """A missing field has no line of its own: the line of the mapping holding it is used."""
        err = error_of(HEADER + "spec:\n  rules:\n    - name: r\n      allow:\n        agent: x\n")

        assert (err.line, err.path, err.problem) == (
            7,
            "spec.rules[0].allow.callers",
            "required field is missing",
        )

    def test_missing_top_level_fields_and_suggestions(self) -> None:
        err = error_of("kind: Policy\nmetadata: {nam: x}\nspecs: {}\n")

        found = {(e.line, e.path, e.problem) for e in err.errors}
        assert found == {
            (1, "apiVersion", "required field is missing"),
            (1, "spec", "required field is missing"),
            (2, "metadata.name", "required field is missing"),
            (2, "metadata.nam", "unknown field 'nam' (did you mean 'name'?)"),
            (3, "specs", "unknown field 'specs' (did you mean 'spec'?)"),
        }
        assert str(err).endswith("(and 4 more)")

    def test_unknown_field_lists_the_allowed_ones(self) -> None:
        err = error_of(doc("  zzz: 1\n"))

        assert err.problem == (
            "unknown field 'zzz' (expected one of defaults, rules, endpoints, routes, delegation)"
        )
        assert (err.line, err.path) == (5, "spec.zzz")

    def test_unknown_field_in_an_endpoint_entry_suggests_the_close_one(self) -> None:
        """A misspelt field of an endpoints entry is named with its line and the field meant."""
        text = doc("  endpoints:\n    researcher.answer:\n      timout: 5s\n")

        with pytest.raises(
            PolicyError,
            match=r'^p\.yaml:7: spec\.endpoints\["researcher\.answer"\]\.timout: '
            r"unknown field 'timout' \(did you mean 'timeout'\?\)$",
        ):
            parse_policy(text, "p.yaml")

    def test_all_errors_are_collected_in_line_order(self) -> None:
        text = doc(
            "  rules:\n"  # 5
            "    - name: a\n"  # 6
            "      allow: {callers: planner}\n"  # 7
            "    - name: b\n"  # 8
            '      deny: {callers: ["Bad"], agent: "x.y"}\n'  # 9
            "    - name: c\n"  # 10
            "    - {name: d, allow: {callers: []}}\n"  # 11
            "  endpoints:\n"  # 12
            "    bad: {timeout: -1}\n"  # 13
            "    a.b: {retries: {attempts: 0}, rate_limit: {per_caller: 0/s}}\n"  # 14
            "  defaults: {authorization: maybe, mode: loud, access_log: 1}\n"  # 15
        )
        err = error_of(text)

        expected = [
            (7, "spec.rules[0].allow.callers", "expected a list (got 'planner')"),
            (9, "spec.rules[1].deny.callers[0]", "invalid agent name 'Bad'"),
            (9, "spec.rules[1].deny.agent", "invalid agent name 'x.y'"),
            (10, "spec.rules[2]", "exactly one of allow or deny is required"),
            (11, "spec.rules[3].allow.callers", "must not be empty"),
            (13, "spec.endpoints.bad", "invalid endpoint key 'bad'"),
            (13, "spec.endpoints.bad.timeout", "invalid duration -1"),
            (14, 'spec.endpoints["a.b"].retries.attempts', "Input should be greater than or equal"),
            (14, 'spec.endpoints["a.b"].rate_limit.per_caller', "invalid rate '0/s'"),
            (15, "spec.defaults.authorization", "Input should be 'allow' or 'deny' (got 'maybe')"),
            (15, "spec.defaults.mode", "Input should be 'enforce' or 'audit' (got 'loud')"),
            (15, "spec.defaults.access_log", "expected true or false (got 1)"),
        ]
        assert [(e.line, e.path) for e in err.errors] == [
            (line, path) for line, path, _ in expected
        ]
        for e, (_, _, problem) in zip(err.errors, expected, strict=True):
            assert e.problem.startswith(problem), (e.problem, problem)
        assert str(err) == (
            "p.yaml:7: spec.rules[0].allow.callers: expected a list (got 'planner') (and 11 more)"
        )
        assert all(e.source == "p.yaml" for e in err.errors)

    def test_duplicate_rule_names(self) -> None:
        err = error_of(
            doc(
                "  rules:\n"
                "    - {name: a, allow: {callers: [x]}}\n"
                "    - {name: b, allow: {callers: [x]}}\n"
                "    - name: a\n"
                "      deny: {callers: [x]}\n"
            )
        )

        assert (err.line, err.path) == (8, "spec.rules[2].name")
        assert err.problem == "duplicate rule name 'a' (first used by spec.rules[0])"

    def test_duplicate_yaml_keys(self) -> None:
        """YAML would silently keep the last of two equal keys; a policy refuses them."""
        err = error_of(
            doc(
                "  endpoints:\n"
                "    a.b: {timeout: 1s}\n"
                "    a.b: {timeout: 2s}\n"
                "  rules:\n"
                "    - {name: r, allow: {callers: [x]}, allow: {callers: [y]}}\n"
            )
        )

        got = [(e.line, e.path, e.problem) for e in err.errors]
        assert got == [
            (7, 'spec.endpoints["a.b"]', "duplicate key 'a.b' (first at line 6)"),
            (9, "spec.rules[0].allow", "duplicate key 'allow' (first at line 9)"),
        ]

    def test_neither_allow_nor_deny(self) -> None:
        err = error_of(doc("  rules:\n    - name: lonely\n"))

        assert (err.line, err.path, err.problem) == (
            6,
            "spec.rules[0]",
            "exactly one of allow or deny is required",
        )

    def test_misspelt_allow_is_an_unknown_field(self) -> None:
        err = error_of(doc("  rules:\n    - name: r\n      alow: {callers: [x]}\n"))

        assert (err.line, err.path) == (7, "spec.rules[0].alow")
        assert err.problem == "unknown field 'alow' (did you mean 'allow'?)"

    @pytest.mark.parametrize(
        ("rule", "path", "problem"),
        [
            ('{callers: ["role:Admin"]}', "callers[0]", "invalid role name 'Admin'"),
            ('{callers: ["pl@n*"]}', "callers[0]", "invalid agent pattern 'pl@n*'"),
            ("{callers: [x], endpoints: [a.b]}", "endpoints[0]", "invalid endpoint name 'a.b'"),
            ("{callers: [x], agent: [a]}", "agent", "expected a agent name or pattern"),
            ("{callers: [1]}", "callers[0]", "expected a agent name or pattern"),
        ],
    )
    def test_bad_patterns(self, rule: str, path: str, problem: str) -> None:
        err = error_of(doc(f"  rules:\n    - name: r\n      allow: {rule}\n"))

        assert err.path == f"spec.rules[0].allow.{path}"
        assert err.problem.startswith(problem)
        assert err.line == 7

    @pytest.mark.parametrize(
        ("limit", "path", "problem"),
        [
            ("{}", "", "a rate limit needs per_caller, total, per_origin or several"),
            ("{total: 5/s, burst: 3}", ".burst", "burst sizes the per_caller bucket"),
            ("{per_caller: 5/s, total_burst: 3}", ".total_burst", "total_burst needs total"),
            ("{per_caller: 5/s, burst: 0}", ".burst", "Input should be greater than or equal"),
            ("{per_caller: 5/s, burst: 2.5}", ".burst", "expected an integer"),
        ],
    )
    def test_bad_rate_limits(self, limit: str, path: str, problem: str) -> None:
        err = error_of(doc(f"  endpoints:\n    a.b:\n      rate_limit: {limit}\n"))

        assert err.path == f'spec.endpoints["a.b"].rate_limit{path}'
        assert err.problem.startswith(problem)
        assert err.line == 7

    @pytest.mark.parametrize("key", ["a", "a.b.c", "A.b", ".b", "a."])
    def test_bad_endpoint_keys(self, key: str) -> None:
        err = error_of(doc(f'  endpoints:\n    "{key}": {{timeout: 1s}}\n'))

        assert err.line == 6
        assert "endpoint key" in err.problem or "name" in err.problem

    def test_several_documents(self) -> None:
        err = error_of(HEADER + "spec: {}\n---\nkind: Policy\n")

        assert err.line == 5
        assert "invalid YAML" in err.problem and "single document" in err.problem

    def test_syntax_error_at_top_level(self) -> None:
        err = error_of("apiVersion: mesh/v1\nkind: [Policy\n")

        assert err.line == 3
        assert err.path == "kind[0]"

    def test_syntax_error_after_a_list_used_as_a_key(self) -> None:
        """After a key that is a list (``? [a, b]``), a syntax error still names its entry."""
        text = HEADER.replace("metadata: {name: test}\n", "") + (
            "metadata:\n  ? [a, b]\n  : x\n  name: {p: @\n"
        )

        with pytest.raises(
            PolicyError,
            match=r"^p\.yaml:6: metadata\.name\.p: invalid YAML: found character '@' that "
            r"cannot start any token",
        ):
            parse_policy(text, "p.yaml")

    def test_syntax_error_in_the_value_of_a_list_used_as_a_key(self) -> None:
        """An error in the value of a list key (no name to show) is placed in its mapping."""
        text = "metadata:\n  ? [a, b]\n  : - x\n    - @\n"

        with pytest.raises(
            PolicyError,
            match=r"^p\.yaml:4: metadata\[0\]: invalid YAML: found character '@'",
        ):
            parse_policy(text, "p.yaml")

    def test_syntax_error_after_a_complete_entry(self) -> None:
        """A syntax error where a key should be names the mapping, not the entry before."""
        text = "metadata:\n  name: p\n  @bad\n"

        with pytest.raises(
            PolicyError, match=r"^p\.yaml:3: metadata: invalid YAML: found character '@'"
        ):
            parse_policy(text, "p.yaml")

    def test_tab_indentation(self) -> None:
        err = error_of(HEADER + "spec:\n\trules: []\n")

        assert err.line == 5
        assert "invalid YAML" in err.problem

    def test_unprintable_character(self) -> None:
        err = error_of(HEADER + "spec: {}\n\x00\n")

        assert (err.line, err.problem) == (5, "invalid YAML: unacceptable character #x0000")

    def test_unprintable_character_after_a_blank_first_line(self) -> None:
        """The line of an unprintable character counts a newline that opens the document."""
        with pytest.raises(
            PolicyError, match=r"^p\.yaml:3: invalid YAML: unacceptable character #x0007$"
        ):
            parse_policy("\napiVersion: mesh/v1\nkind: \x07Policy\n", "p.yaml")

    def test_unknown_yaml_tag(self) -> None:
        """Only plain YAML data: python tags are refused, never constructed."""
        err = error_of(HEADER + "spec: !!python/object/apply:os.system [true]\n")

        assert err.line == 4
        assert "could not determine a constructor" in err.problem

    def test_policy_error_collect(self) -> None:
        a = PolicyError("first", source="f", line=1, path="x")
        b = PolicyError("second", source="f", line=None, path="")

        both = PolicyError.collect([a, b])
        assert str(both) == "f:1: x: first (and 1 more)"
        assert [e.location_text() for e in both.errors] == ["f:1: x: first", "f: second"]


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


def engine_of(rules: list[dict[str, Any]], **defaults: Any) -> PolicyEngine:
    return PolicyEngine(policy_of({"rules": rules, "defaults": defaults}))


class TestDecisions:
    @pytest.fixture
    def research(self) -> PolicyEngine:
        return PolicyEngine(
            load_policy(POLICIES / "research.yaml"), revision=7, source="policies/research.yaml"
        )

    @pytest.mark.parametrize(
        ("caller", "roles", "callee", "endpoint", "allowed", "rule"),
        [
            ("planner", (), "researcher", "answer", True, "planner-may-ask"),
            ("someone", ("coordinator",), "researcher", "answer", True, "planner-may-ask"),
            ("researcher", (), "librarian", "lookup", True, "researcher-may-look-up"),
            ("researcher", (), "librarian", "delete", False, "nobody-deletes"),
            ("planner", ("admin",), "librarian", "delete-all", False, "nobody-deletes"),
            ("intruder", (), "researcher", "answer", False, "default deny"),
            ("planner", (), "librarian", "lookup", False, "default deny"),
            ("planner", (), "researcher", "other", False, "default deny"),
        ],
    )
    def test_research_policy(
        self,
        research: PolicyEngine,
        caller: str,
        roles: tuple[str, ...],
        callee: str,
        endpoint: str,
        allowed: bool,
        rule: str,
    ) -> None:
        """The demo policy: planner asks, researcher looks up, nobody deletes, intruder denied."""
        d = research.decide(caller, roles, callee, endpoint)

        assert (d.allowed, d.rule, d.audit_only) == (allowed, rule, False)
        assert d.effect == ("allow" if allowed else "deny")

    def test_deny_rules_come_first_whatever_their_place(self) -> None:
        e = engine_of(
            [
                {"name": "allow-all", "allow": {"callers": ["*"]}},
                {"name": "no-delete", "deny": {"callers": ["*"], "endpoints": ["delete"]}},
            ]
        )

        assert e.decide("a", (), "b", "delete") == Decision(False, "no-delete", "deny", False)
        assert e.decide("a", (), "b", "read") == Decision(True, "allow-all", "allow", False)

    def test_first_matching_rule_in_file_order_names_the_decision(self) -> None:
        e = engine_of(
            [
                {"name": "d1", "deny": {"callers": ["a"]}},
                {"name": "d2", "deny": {"callers": ["*"]}},
                {"name": "a1", "allow": {"callers": ["b"]}},
                {"name": "a2", "allow": {"callers": ["*"]}},
            ]
        )

        assert e.decide("a", (), "x", "y").rule == "d1"
        assert e.decide("b", (), "x", "y").rule == "d2"

    def test_roles(self) -> None:
        e = engine_of(
            [
                {"name": "coord", "allow": {"callers": ["role:coordinator"], "agent": "w"}},
                {"name": "ops", "allow": {"callers": ["role:ops-*"], "agent": "v"}},
            ]
        )

        assert e.decide("x", ("coordinator",), "w", "go").rule == "coord"
        assert e.decide("x", ("reader", "coordinator"), "w", "go").rule == "coord"
        assert e.decide("x", (), "w", "go").rule == "default deny"
        assert e.decide("coordinator", (), "w", "go").rule == "default deny"  # a name, no role
        assert e.decide("x", ("ops-eu",), "v", "go").rule == "ops"
        assert e.decide("x", ("ops",), "v", "go").rule == "default deny"

    def test_role_pattern_is_not_an_agent_pattern(self) -> None:
        """``role:*`` needs at least one role; ``*`` matches any caller."""
        e = engine_of([{"name": "r", "allow": {"callers": ["role:*"]}}])

        assert e.decide("a", (), "b", "c").rule == "default deny"
        assert e.decide("a", ("any",), "b", "c").rule == "r"

    @pytest.mark.parametrize(
        ("pattern", "name", "matches"),
        [
            ("plan*", "planner", True),
            ("plan*", "plan", True),
            ("plan*", "xplanner", False),
            ("?x", "ax", True),
            ("?x", "aax", False),
            ("[ab]x", "bx", True),
            ("[ab]x", "cx", False),
            ("[!ab]x", "cx", True),
            ("*", "anything", True),
            ("planner", "planner", True),
            ("planner", "planner2", False),
        ],
    )
    def test_globs_in_every_position(self, pattern: str, name: str, matches: bool) -> None:
        """The same glob semantics for caller names, roles, the callee and endpoints."""
        cases = [
            ({"callers": [pattern]}, (name, (), "callee", "ep")),
            ({"callers": [f"role:{pattern}"]}, ("c", (name,), "callee", "ep")),
            ({"callers": ["*"], "agent": pattern}, ("c", (), name, "ep")),
            ({"callers": ["*"], "endpoints": [pattern]}, ("c", (), "callee", name)),
        ]
        for match, call in cases:
            e = engine_of([{"name": "r", "allow": match}])

            assert e.decide(*call).allowed is matches, match

    def test_default_allow(self) -> None:
        e = engine_of([{"name": "no", "deny": {"callers": ["bad"]}}], authorization="allow")

        assert e.decide("good", (), "a", "b") == Decision(True, "default allow", "allow", False)
        assert e.decide("bad", (), "a", "b") == Decision(False, "no", "deny", False)

    def test_audit_mode(self) -> None:
        """Audit mode lets would-be denials through, marked ``audit_only``."""
        e = engine_of([{"name": "no", "deny": {"callers": ["bad"]}}], mode="audit")

        assert e.mode == "audit"
        assert e.decide("bad", (), "a", "b") == Decision(True, "no", "deny", True)
        assert e.decide("x", (), "a", "b") == Decision(True, "default deny", "deny", True)

    def test_audit_mode_allow_is_plain(self) -> None:
        e = engine_of([{"name": "yes", "allow": {"callers": ["x"]}}], mode="audit")

        assert e.decide("x", (), "a", "b") == Decision(True, "yes", "allow", False)

    def test_no_policy_allows_everything(self) -> None:
        e = PolicyEngine(None)

        assert e.decide("anyone", (), "any", "thing") == Decision(True, "no policy", "allow", False)
        assert (e.policy, e.revision, e.source, e.mode) == (None, None, None, "enforce")
        assert e.endpoint_settings("a", "b") is None
        assert e.timeout_for("a", "b") is None

    def test_engine_properties(self, research: PolicyEngine) -> None:
        assert research.revision == 7
        assert research.source == "policies/research.yaml"
        assert research.mode == "enforce"
        assert research.policy is not None and research.policy.metadata.name == "research-team"

    def test_cache_returns_the_same_results(self, research: PolicyEngine) -> None:
        """A cached decision is the same object; a fresh engine gives equal decisions."""
        fresh = PolicyEngine(research.policy)
        inputs = [
            ("planner", (), "researcher", "answer"),
            ("intruder", (), "researcher", "answer"),
            ("x", ("coordinator",), "researcher", "answer"),
            ("x", (), "librarian", "delete-x"),
        ]
        first = [research.decide(*i) for i in inputs]
        again = [research.decide(*i) for i in inputs]

        assert all(a is b for a, b in zip(first, again, strict=True))
        assert first == [fresh._evaluate(*i) for i in inputs]

    def test_cache_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(engine_mod, "_CACHE_MAX", 8)
        e = engine_of([{"name": "r", "allow": {"callers": ["a*"]}}])

        for i in range(50):
            assert e.decide(f"a{i}", (), "x", "y").rule == "r"
            assert e.endpoint_settings(f"a{i}", "y") is None
            assert e.route(f"a{i}", (), "x", "y").decision.rule == "r"
            assert len(e._decisions) <= 8 and len(e._settings) <= 8 and len(e._routes) <= 8

    def test_cache_holds_10000_answers(self) -> None:
        """The caches keep 10 000 answers; the next new one empties them first."""
        e = engine_of([{"name": "r", "allow": {"callers": ["a*"]}}])
        for i in range(10_000):
            e.decide(f"a{i}", (), "x", "y")
            e.endpoint_settings("x", f"y{i}")
        assert len(e._decisions) == len(e._settings) == 10_000

        assert e.decide("a-new", (), "x", "y").rule == "r"
        assert e.endpoint_settings("x", "y-new") is None
        assert len(e._decisions) == len(e._settings) == 1


class TestExplain:
    @pytest.mark.parametrize(
        ("decision", "source", "revision", "text"),
        [
            (
                Decision(True, "planner-may-ask", "allow", False),
                "policies/research.yaml",
                7,
                'ALLOW by rule "planner-may-ask" (policies/research.yaml, revision 7)',
            ),
            (
                Decision(False, "default deny", "deny", False),
                None,
                3,
                "DENY by default deny (revision 3)",
            ),
            (Decision(True, "default allow", "allow", False), None, None, "ALLOW by default allow"),
            (Decision(False, "x", "deny", False), "f.yaml", None, 'DENY by rule "x" (f.yaml)'),
            (
                Decision(True, "x", "deny", True),
                None,
                None,
                'ALLOW (audit mode; would DENY by rule "x")',
            ),
            (
                Decision(True, "default deny", "deny", True),
                "f.yaml",
                2,
                "ALLOW (audit mode; would DENY by default deny; f.yaml, revision 2)",
            ),
            (
                Decision(True, "no policy", "allow", False),
                None,
                None,
                "ALLOW (no policy installed)",
            ),
        ],
    )
    def test_explain(
        self, decision: Decision, source: str | None, revision: int | None, text: str
    ) -> None:
        assert decision.explain(source, revision) == text

    def test_engine_explain_uses_its_source_and_revision(self) -> None:
        e = PolicyEngine(
            load_policy(POLICIES / "research.yaml"), revision=4, source="policies/research.yaml"
        )

        assert e.explain("intruder", (), "researcher", "answer") == (
            "DENY by default deny (policies/research.yaml, revision 4)"
        )


# --------------------------------------------------------------------------------------------
# Endpoint settings
# --------------------------------------------------------------------------------------------


class TestEndpointSettings:
    @pytest.fixture
    def engine(self) -> PolicyEngine:
        return PolicyEngine(
            parse_policy(
                doc(
                    "  defaults: {timeout: 10s}\n"
                    "  endpoints:\n"
                    "    '*.*': {timeout: 1s}\n"
                    "    '*.answer': {timeout: 2s}\n"
                    "    'res*.ans*': {timeout: 3s}\n"
                    "    'researcher.*': {timeout: 4s}\n"
                    "    'researcher.answer': {timeout: 5s}\n"
                    "    'r*.*': {timeout: 6s}\n"
                    "    'lib*.lookup': {retries: {attempts: 2}}\n"
                )
            )
        )

    @pytest.mark.parametrize(
        ("agent", "endpoint", "timeout"),
        [
            ("researcher", "answer", 5.0),  # exact beats everything
            ("researcher", "ask", 4.0),  # exact agent beats glob agent
            ("reserve", "answer", 2.0),  # exact endpoint beats glob endpoint
            ("reserve", "answers", 3.0),  # more literal characters win among globs
            ("rover", "x", 6.0),
            ("other", "x", 1.0),
            ("librarian", "lookup", 10.0),  # matched key has no timeout: defaults.timeout
        ],
    )
    def test_most_specific_key_wins(
        self, engine: PolicyEngine, agent: str, endpoint: str, timeout: float
    ) -> None:
        assert engine.timeout_for(agent, endpoint) == timeout

    def test_settings_are_not_merged(self, engine: PolicyEngine) -> None:
        ep = engine.endpoint_settings("librarian", "lookup")

        assert ep is not None
        assert ep.retries is not None and ep.retries.attempts == 2
        assert ep.timeout is None

    def test_cached(self, engine: PolicyEngine) -> None:
        assert engine.endpoint_settings("researcher", "x") is engine.endpoint_settings(
            "researcher", "x"
        )

    def test_no_match(self) -> None:
        e = PolicyEngine(parse_policy(doc("  endpoints: {a.b: {timeout: 1s}}\n")))

        assert e.endpoint_settings("a", "c") is None
        assert e.timeout_for("a", "c") is None
        assert e.timeout_for("a", "b") == 1.0

    def test_equal_specificity_first_in_file_wins(self) -> None:
        e = PolicyEngine(
            parse_policy(
                doc("  endpoints:\n    'a*.x': {timeout: 1s}\n    'b*.x': {timeout: 2s}\n")
            )
        )

        assert e.timeout_for("ab", "x") == 1.0
        assert e.timeout_for("ba", "x") == 2.0


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------


class TestRoute:
    @pytest.fixture
    def engine(self) -> PolicyEngine:
        return PolicyEngine(
            parse_policy(
                doc(
                    "  defaults: {timeout: 10s, access_log: true}\n"
                    "  rules:\n"
                    "    - {name: ask, allow: {callers: [planner], agent: researcher}}\n"
                    "  endpoints:\n"
                    "    '*.*': {timeout: 1s}\n"
                    "    researcher.answer:\n"
                    "      timeout: 30s\n"
                    "      retries: {attempts: 3, per_try_timeout: 10s}\n"
                    "      rate_limit: {per_caller: 20/s}\n"
                    "      access_log: false\n"
                    "    librarian.lookup: {retries: {attempts: 2}}\n"
                )
            )
        )

    def test_route_carries_the_decision_and_its_rule(self, engine: PolicyEngine) -> None:
        """A route's decision is ``decide``'s, naming the rule."""
        r = engine.route("planner", (), "researcher", "answer")

        assert r.decision == Decision(True, "ask", "allow", False)
        assert engine.route("intruder", (), "researcher", "answer").decision.rule == "default deny"

    def test_route_carries_the_winning_endpoint_settings(self, engine: PolicyEngine) -> None:
        """A route holds the most specific endpoint entry and its timeout, retries, rate limit
        and access-log flag."""
        r = engine.route("planner", (), "researcher", "answer")

        assert r.settings is engine.endpoint_settings("researcher", "answer")
        assert r.timeout == 30.0
        assert r.retries is not None and (r.retries.attempts, r.retries.per_try_timeout) == (
            3,
            10.0,
        )
        assert r.rate_limit is not None and r.rate_limit.per_caller == 20.0
        assert r.access_log is False

    def test_route_falls_back_to_the_defaults(self, engine: PolicyEngine) -> None:
        """An entry without timeout or access_log gets ``defaults.timeout`` and
        ``defaults.access_log``, as ``timeout_for`` and the access log do."""
        r = engine.route("planner", (), "librarian", "lookup")

        assert r.timeout == 10.0 == engine.timeout_for("librarian", "lookup")
        assert r.access_log is True
        assert r.retries is not None and r.retries.attempts == 2
        assert r.rate_limit is None

    def test_route_is_cached(self, engine: PolicyEngine) -> None:
        """A second call returns the identical (cached) route object."""
        first = engine.route("planner", ("ops",), "researcher", "answer")

        assert engine.route("planner", ("ops",), "researcher", "answer") is first

    def test_route_is_frozen(self, engine: PolicyEngine) -> None:
        """A route cannot be changed by whoever holds it."""
        r = engine.route("planner", (), "researcher", "answer")

        with pytest.raises(AttributeError):
            r.timeout = 1.0  # type: ignore[misc]

    def test_route_without_policy(self) -> None:
        """No policy: a "no policy" allow and no settings at all."""
        r = PolicyEngine(None).route("anyone", (), "any", "thing")

        assert r == Route(
            decision=Decision(True, "no policy", "allow", False),
            settings=None,
            timeout=None,
            retries=None,
            rate_limit=None,
            access_log=False,
        )


# --------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------


class TestDiff:
    BASE: dict[str, Any] = {
        "defaults": {"timeout": "10s"},
        "rules": [
            {"name": "a", "allow": {"callers": ["x"], "agent": "y"}},
            {"name": "b", "deny": {"callers": ["*"], "endpoints": ["delete*"]}},
            {"name": "c", "allow": {"callers": ["role:ops"]}},
        ],
        "endpoints": {"y.go": {"timeout": "30s"}, "y.*": {"timeout": "2s"}},
    }

    def test_identical(self) -> None:
        p = policy_of(self.BASE)

        assert diff_policies(p, policy_of(self.BASE)) == []

    def test_description_change(self) -> None:
        """A changed description is one line with the old and the new text, quoted."""
        old = policy_of(self.BASE)
        new = old.model_copy(update={"metadata": Metadata(name="test", description="v2: ops")})

        assert diff_policies(old, new) == ["metadata.description '' -> 'v2: ops'"]

    def test_from_nothing(self) -> None:
        lines = diff_policies(None, policy_of(self.BASE))

        assert lines == [
            'policy "test" (no policy installed before)',
            "defaults: authorization=deny mode=enforce timeout=10s access_log=false",
            'rule "a" added: allow callers=[x] agent=y endpoints=[*]',
            'rule "b" added: deny callers=[*] agent=* endpoints=[delete*]',
            'rule "c" added: allow callers=[role:ops] agent=* endpoints=[*]',
            "endpoint y.go added: timeout=30s",
            "endpoint y.* added: timeout=2s",
        ]

    def test_changes(self) -> None:
        new = {
            "defaults": {"timeout": "15s", "mode": "audit"},
            "rules": [
                {"name": "c", "allow": {"callers": ["role:ops"]}},
                {"name": "a", "allow": {"callers": ["x", "z"], "agent": "y"}},
                {"name": "d", "deny": {"callers": ["evil"]}},
            ],
            "endpoints": {
                "y.go": {
                    "timeout": "20s",
                    "rate_limit": {"per_caller": "5/s", "total": "600/m"},
                },
                "z.*": {"retries": {"attempts": 2, "per_try_timeout": "250ms"}},
            },
        }

        lines = diff_policies(policy_of(self.BASE), policy_of(new, name="renamed"))

        assert lines == [
            "metadata.name test -> renamed",
            "defaults.mode enforce -> audit",
            "defaults.timeout 10s -> 15s",
            'rule "a" changed: allow callers=[x] agent=y endpoints=[*] -> '
            "allow callers=[x, z] agent=y endpoints=[*]",
            'rule "d" added: deny callers=[evil] agent=* endpoints=[*]',
            'rule "b" removed',
            "rule order changed: a, c -> c, a",
            "endpoint y.go changed: timeout 30s -> 20s; rate_limit.per_caller none -> 5/s; "
            "rate_limit.burst none -> 5; rate_limit.total none -> 10/s; "
            "rate_limit.total_burst none -> 10",
            "endpoint z.* added: retries.attempts=2 retries.per_try_timeout=250ms",
            "endpoint y.* removed",
        ]

    def test_effect_flip(self) -> None:
        new = dict(self.BASE)
        new["rules"] = [
            {"name": "a", "deny": {"callers": ["x"], "agent": "y"}},
            *self.BASE["rules"][1:],
        ]

        assert diff_policies(policy_of(self.BASE), policy_of(new)) == [
            'rule "a" changed: allow callers=[x] agent=y endpoints=[*] -> '
            "deny callers=[x] agent=y endpoints=[*]"
        ]


# --------------------------------------------------------------------------------------------
# Property: the engine equals a plain reference evaluation
# --------------------------------------------------------------------------------------------

NAMES = ["planner", "plan", "researcher", "librarian", "ab", "bb"]
ROLES = ["ops", "ops-eu", "coordinator", "reader"]
ENDPOINTS = ["answer", "lookup", "delete", "delete-all", "ab"]
NAME_PATTERNS = [*NAMES, "*", "plan*", "*er", "?b", "[ab]b", "r*r", "[!p]*"]
ROLE_PATTERNS = [*ROLES, "*", "ops*", "?eader"]
ENDPOINT_PATTERNS = [*ENDPOINTS, "*", "delete*", "?b", "*up"]


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 6))
    rules = []
    for i in range(n):
        callers = draw(
            st.lists(
                st.one_of(
                    st.sampled_from(NAME_PATTERNS),
                    st.sampled_from(ROLE_PATTERNS).map(lambda r: f"role:{r}"),
                ),
                min_size=1,
                max_size=3,
            )
        )
        match = {
            "callers": callers,
            "agent": draw(st.sampled_from(NAME_PATTERNS)),
            "endpoints": draw(st.lists(st.sampled_from(ENDPOINT_PATTERNS), min_size=1, max_size=3)),
        }
        rules.append({"name": f"r{i}", draw(st.sampled_from(["allow", "deny"])): match})
    return {
        "rules": rules,
        "defaults": {
            "authorization": draw(st.sampled_from(["allow", "deny"])),
            "mode": draw(st.sampled_from(["enforce", "audit"])),
        },
    }


def reference_decide(
    spec: dict[str, Any], caller: str, roles: tuple[str, ...], callee: str, endpoint: str
) -> tuple[bool, str, str, bool]:
    """The evaluation order written as plainly as possible."""

    def caller_matches(pattern: str) -> bool:
        if pattern.startswith("role:"):
            return any(fnmatch.fnmatchcase(role, pattern[5:]) for role in roles)
        return fnmatch.fnmatchcase(caller, pattern)

    def rule_matches(match: dict[str, Any]) -> bool:
        return (
            any(caller_matches(p) for p in match["callers"])
            and fnmatch.fnmatchcase(callee, match["agent"])
            and any(fnmatch.fnmatchcase(endpoint, p) for p in match["endpoints"])
        )

    audit = spec["defaults"]["mode"] == "audit"
    for effect in ("deny", "allow"):
        for rule in spec["rules"]:
            if effect in rule and rule_matches(rule[effect]):
                if effect == "deny":
                    return (audit, rule["name"], "deny", audit)
                return (True, rule["name"], "allow", False)
    default = spec["defaults"]["authorization"]
    if default == "deny":
        return (audit, "default deny", "deny", audit)
    return (True, "default allow", "allow", False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=rule_sets(),
    calls=st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.lists(st.sampled_from(ROLES), max_size=2, unique=True).map(tuple),
            st.sampled_from(NAMES),
            st.sampled_from(ENDPOINTS),
        ),
        min_size=1,
        max_size=15,
    ),
)
def test_decide_equals_reference(
    spec: dict[str, Any], calls: list[tuple[str, tuple[str, ...], str, str]]
) -> None:
    """For random rule sets and calls, the compiled, cached engine agrees with the reference."""
    engine = PolicyEngine(policy_of(spec))

    for _ in range(2):  # the second pass is served from the cache
        for caller, roles, callee, endpoint in calls:
            d = engine.decide(caller, roles, callee, endpoint)
            assert (d.allowed, d.rule, d.effect, d.audit_only) == reference_decide(
                spec, caller, roles, callee, endpoint
            )


def test_parse_canonical_round_trips_and_reports_like_parse_policy() -> None:
    """The distributed (canonical JSON) form parses to the same policy; a bad one still
    yields a PolicyError naming the source."""
    from mesh._core.policy import canonical_policy_bytes, parse_canonical

    text = (POLICIES / "research.yaml").read_text()
    policy = parse_policy(text, source="research.yaml")
    assert parse_canonical(canonical_policy_bytes(policy)) == policy
    with pytest.raises(PolicyError) as info:
        parse_canonical(b'{"apiVersion": "mesh/v1", "kind": "Policy"}', source="rev-9")
    assert info.value.source == "rev-9"


class TestWrittenUnits:
    @given(st.floats(min_value=0.001, max_value=10 * 365 * 86400, allow_nan=False))
    def test_format_duration_parses_back_exactly(self, seconds: float) -> None:
        """A formatted duration parses back to the same float (a number only where no unit
        form would)."""
        text = format_duration(seconds)
        assert parse_duration(text) == seconds

    @given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False))
    def test_format_rate_parses_back_exactly(self, rate: float) -> None:
        """A formatted rate parses back to the same float."""
        assert parse_rate(format_rate(rate)) == rate

    def test_whole_units_are_written_as_people_write_them(self) -> None:
        """7 days, 10 seconds and 250 ms are written 7d, 10s and 250ms; 20 per second 20/s."""
        assert [format_duration(s) for s in (604800.0, 10.0, 0.25, 90.0)] == [
            "7d",
            "10s",
            "250ms",
            "90s",
        ]
        assert format_rate(20.0) == "20/s"

    def test_policy_text_loads_with_units_required_and_equals_the_policy(self) -> None:
        """The YAML ``policy_text`` writes passes the policy-file rules (units required) and
        is the same policy."""
        for path in sorted(POLICIES.glob("*.yaml")):
            policy = load_policy(path)
            text = policy_text(policy)
            again = parse_policy(text, source="printed.yaml", require_units=True)
            assert canonical_policy_bytes(again) == canonical_policy_bytes(policy), path
