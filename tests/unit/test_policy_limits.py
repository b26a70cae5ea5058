"""Policy scalars, documents and decisions at their limits, each refusal with its message
(``docs/policy.md``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import TypeAdapter, WrapSerializer
from pydantic_core import PydanticCustomError

from mesh._core.policy import PolicyError, load_policy, parse_duration, parse_policy
from mesh._core.policy.engine import PolicyEngine
from mesh._core.policy.load import _fields_at, _line_of
from mesh._core.policy.model import (
    WITH_UNITS,
    RateLimitSpec,
    RetrySpec,
    _as_field,
    _check_plain_name,
    _written,
    format_duration,
    parse_rate,
)
from mesh._core.resilience import Backoff, LeastLoadedPicker
from mesh.errors import InvalidArgument

POLICY = """
apiVersion: mesh/v1
kind: Policy
metadata: {name: p}
spec:
  rules:
    - name: r
      allow: {callers: ["a*", carol], agent: b, endpoints: ["*"]}
"""


class TestDurations:
    @pytest.mark.parametrize(
        ("value", "example"), [("30", "30s"), ("0.5", "0.5s"), ("0", "30s"), (-2, "30s")]
    )
    def test_bare_number_names_a_fix(self, value: str | int, example: str) -> None:
        """A number without a unit is refused with the same number and a unit as the fix
        (30s when the number is not positive)."""
        with pytest.raises(InvalidArgument, match=rf"add a unit, e.g. {example}$"):
            parse_duration(value, bare_seconds=False)

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(86400.0, "1d"), (3600.0, "1h"), (7200.0, "2h"), (60.0, "1m"), (90.0, "90s")],
    )
    def test_written_with_the_largest_whole_unit(self, seconds: float, text: str) -> None:
        """A duration is written in the largest unit that divides it, from exactly one unit."""
        assert format_duration(seconds) == text
        assert parse_duration(text) == seconds

    def test_below_a_minute(self) -> None:
        """59 s stays seconds; 61 s is not whole minutes."""
        assert format_duration(59.0) == "59s"
        assert format_duration(61.0) == "61s"
        assert format_duration(3660.0) == "61m"


class TestModel:
    @pytest.mark.parametrize("attempts", [0, 11])
    def test_retry_attempts_between_1_and_10(self, attempts: int) -> None:
        """Retries allow 1 to 10 attempts."""
        with pytest.raises(ValueError, match="attempts"):
            RetrySpec.model_validate({"attempts": attempts})
        assert RetrySpec.model_validate({"attempts": 1}).attempts == 1
        assert RetrySpec.model_validate({"attempts": 10}).attempts == 10

    def test_total_capacity_rounds_the_rate_up(self) -> None:
        """Without total_burst, the shared bucket holds the total rate rounded up, at least 1."""
        assert RateLimitSpec.model_validate({"total": "0.5/s"}).total_capacity == 1
        assert RateLimitSpec.model_validate({"total": "2.5/s"}).total_capacity == 3
        assert RateLimitSpec.model_validate({"per_caller": "1/s"}).total_capacity == 0

    @pytest.mark.parametrize("name", [5, None, ["x"]])
    def test_metadata_name_must_be_a_string(self, name: object) -> None:
        """A policy name that is not a string is refused saying so."""
        text = POLICY.replace("{name: p}", "{name: " + (repr(name) if name else "null") + "}")

        with pytest.raises(PolicyError, match=r"expected a policy name \(a string\)"):
            parse_policy(text.replace("['x']", "[x]"))

    def test_metadata_name_must_be_a_valid_name(self) -> None:
        """A policy name with characters a name cannot have is refused."""
        with pytest.raises(PolicyError, match=r"metadata.name"):
            parse_policy(POLICY.replace("{name: p}", '{name: "a b"}'))


class TestDocuments:
    def test_null_where_a_mapping_belongs(self) -> None:
        """A null where a mapping belongs is refused saying what was got."""
        with pytest.raises(PolicyError, match=r"metadata: expected a mapping \(got None\)$"):
            parse_policy(POLICY.replace("metadata: {name: p}", "metadata:"))

    def test_top_level_must_be_a_mapping(self) -> None:
        """A document that is a list is refused at line 1."""
        with pytest.raises(PolicyError, match=r"<string>:1: expected a mapping \(apiVersion"):
            parse_policy("- a\n- b\n")

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A path that cannot be read is refused naming the reason."""
        with pytest.raises(PolicyError, match="cannot read the file: "):
            load_policy(tmp_path)

    def test_line_of_an_error_in_a_list(self) -> None:
        """An error inside a list item names that item's line and index."""
        text = POLICY.replace(
            'allow: {callers: ["a*", carol], agent: b, endpoints: ["*"]}',
            "allow:\n        agent: b\n        endpoints: ['*']\n        callers:\n"
            "          - a\n          - 7",
        )

        with pytest.raises(PolicyError) as ei:
            parse_policy(text)

        assert ei.value.path == "spec.rules[0].allow.callers[1]"
        assert ei.value.line == 13


class TestEngineSpecificity:
    def test_glob_patterns_mix_with_exact_names(self) -> None:
        """A rule's glob callers match by pattern, exact ones by name, others not at all."""
        engine = PolicyEngine(parse_policy(POLICY))

        assert engine.decide("alice", (), "b", "e").rule == "r"
        assert engine.decide("carol", (), "b", "e").rule == "r"
        assert engine.decide("bob", (), "b", "e").rule == "default deny"

    def test_equal_keys_the_earlier_wins(self) -> None:
        """Of two keys equally specific, the one earlier in the file applies."""
        text = POLICY + (
            "  endpoints:\n"
            "    b.x*: {timeout: 1s}\n"
            "    b.*y: {timeout: 2s}\n"
        )  # fmt: skip
        engine = PolicyEngine(parse_policy(text))

        assert engine.timeout_for("b", "xy") == 1.0

    def test_more_literal_characters_win(self) -> None:
        """Of two glob keys, the one with more literal characters applies."""
        text = POLICY + (
            "  endpoints:\n"
            "    b.a*: {timeout: 1s}\n"
            "    b.ab*: {timeout: 2s}\n"
        )  # fmt: skip
        engine = PolicyEngine(parse_policy(text))

        assert engine.timeout_for("b", "abc") == 2.0


class _Rng(random.Random):
    """Draws fixed indices, to choose which two candidates are compared."""

    def __init__(self, draws: list[int]) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def randrange(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        return self.draws.pop(0)


class TestPicker:
    def test_uses_the_given_random_source(self) -> None:
        """The picker draws from the random source it was given."""
        rng = _Rng([2, 0])
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=rng)

        assert picker.pick(["a", "b", "c"]) == "c"
        assert rng.draws == []

    def test_a_tie_goes_to_the_first_sampled(self) -> None:
        """Equally loaded, the first of the two sampled candidates is picked."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker(rng=_Rng([1, 0]))

        assert picker.pick(["a", "b"]) == "b"

    def test_release_counts_down_to_nothing(self) -> None:
        """Releasing keeps the count of what is still outstanding, and forgets a key at 0."""
        picker: LeastLoadedPicker[str] = LeastLoadedPicker()
        picker.acquire("a")
        picker.acquire("a")

        picker.release("a")
        assert picker.outstanding == {"a": 1}
        picker.release("a")
        assert picker.outstanding == {}

    def test_backoff_bound_for_huge_retry_numbers(self) -> None:
        """A huge retry number still gives a delay within the cap."""
        assert 0.0 <= Backoff(rng=random.Random(1)).delay(10_000) <= 0.25


class TestErrorLocations:
    """Where the loader places an error: the nearest line a path reaches in the document, and
    the fields a "did you mean" hint is drawn from."""

    DOCUMENT = (
        "apiVersion: mesh/v1\n"
        "kind: Policy\n"
        "metadata: {name: p}\n"
        "spec:\n"
        "  rules:\n"
        "    - name: r\n"
        "      allow: {callers: [a]}\n"
    )

    def test_an_index_past_the_end_of_a_list_is_placed_on_the_list(self) -> None:
        """A path to an item a list does not have gets the line of the list's key."""
        root = yaml.compose(self.DOCUMENT)

        assert _line_of(root, ["spec", "rules", 0, "allow", "callers", 0]) == 7
        assert _line_of(root, ["spec", "rules", 1]) == 5
        assert _line_of(root, ["spec", "rules", 1, "name"]) == 5

    def test_a_path_through_a_node_of_another_shape_stops_at_that_node(self) -> None:
        """A key where the document has a list, or an index at a scalar, stops at that node."""
        root = yaml.compose(self.DOCUMENT)

        assert _line_of(root, ["spec", "rules", "name"]) == 5
        assert _line_of(root, ["metadata", "name", 0]) == 3

    def test_a_scalar_has_no_fields_to_suggest(self) -> None:
        """A path ending at, or running through, a scalar has no field names to suggest."""
        assert _fields_at(["metadata", "name"]) is None
        assert _fields_at(["metadata", "name", "first"]) is None
        assert _fields_at(["metadata"]) == ["name", "description"]


class TestFieldFactories:
    """model.py makes its field validators and serializers once, when it is imported; each
    factory is tested here by what a validator or serializer made afresh from it does."""

    def test_a_plain_name_validator_refuses_a_non_string(self) -> None:
        """A name that is not a string is refused saying what kind of name was expected."""
        with pytest.raises(
            PydanticCustomError, match=r"^expected a rule name \(a string\), got 5$"
        ):
            _check_plain_name("rule")(5)

    def test_a_plain_name_validator_refuses_an_invalid_name(self) -> None:
        """A string that is no valid name is refused with the name rules."""
        with pytest.raises(
            PydanticCustomError, match=r"^invalid policy name 'Ops team': use 1-63 of a-z, 0-9"
        ):
            _check_plain_name("policy")("Ops team")

    def test_a_plain_name_validator_returns_a_valid_name(self) -> None:
        """A valid name passes unchanged."""
        assert _check_plain_name("rule")("planner-may-ask") == "planner-may-ask"

    def test_a_scalar_validator_refuses_with_the_parsers_message(self) -> None:
        """A rate the parser refuses is refused with the parser's message, no prefix added."""
        with pytest.raises(
            PydanticCustomError, match=r"^invalid rate 'fast': use N/s, N/m or N/h \(e\.g\. 20/s\)"
        ):
            _as_field(parse_rate)("fast")

    def test_a_serializer_writes_units_only_when_the_context_asks(self) -> None:
        """A duration is written with its unit under WITH_UNITS only, else as a number."""
        seconds = TypeAdapter(
            Annotated[float, WrapSerializer(_written(format_duration), when_used="json")]
        )

        assert seconds.dump_python(90.0, mode="json", context={WITH_UNITS: True}) == "90s"
        assert seconds.dump_python(90.0, mode="json") == 90.0
        assert seconds.dump_python(90.0, mode="json", context={"other": True}) == 90.0
