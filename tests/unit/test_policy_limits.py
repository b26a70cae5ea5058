"""Policy scalars, documents and decisions at their limits, each refusal with its message
(``docs/policy.md``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mesh._core.policy import PolicyError, load_policy, parse_duration, parse_policy
from mesh._core.policy.engine import PolicyEngine
from mesh._core.policy.model import RateLimitSpec, RetrySpec, format_duration
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
