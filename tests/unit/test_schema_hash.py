"""Published endpoint schemas: the canonical JSON (RFC 8785) and the hash a directory record
carries (``docs/protocol.md`` §19), an agent's schemas from its models, and schema pins in the
configuration."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from mesh import Agent, EndpointSchema, MeshConfig
from mesh._core.schemas import (
    NULL_SCHEMA,
    canonical_json,
    describe_endpoint,
    is_schema_hash,
    publish_schemas,
    schema_hash,
)
from mesh.errors import InvalidArgument


class Question(BaseModel):
    text: str = Field(min_length=1, max_length=2000)


class Answer(BaseModel):
    text: str
    score: float = Field(default=0.5, ge=0.0, le=1.0)


class Token(BaseModel):
    index: int


class Opaque:
    """Not a type pydantic can describe in JSON Schema."""


class Odd(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque


# --- canonical JSON ----------------------------------------------------------------------


def test_rfc_8785_example() -> None:
    """The example of RFC 8785 §3.2.4: numbers in ECMAScript form, strings escaped minimally."""
    given = json.loads(
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )

    assert (
        canonical_json(given)
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )


def test_keys_sorted_by_utf16_code_units() -> None:
    """RFC 8785 §3.2.3: keys sort by UTF-16 code units, so an astral character (a surrogate
    pair, 0xD83D...) comes before U+FB33, unlike code point order."""
    keys = ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]

    out = json.loads(canonical_json(dict.fromkeys(keys, 0)))

    assert list(out) == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize(
    ("bits", "text"),
    [  # RFC 8785 Appendix B
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),
        ("0000000000000001", "5e-324"),
        ("7fefffffffffffff", "1.7976931348623157e+308"),
        ("4340000000000000", "9007199254740992"),
        ("4430000000000000", "295147905179352830000"),
        ("44b52d02c7e14af5", "9.999999999999997e+22"),
        ("44b52d02c7e14af6", "1e+23"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("41b3de4355555555", "333333333.3333333"),
        ("4415af1d78b58c40", "100000000000000000000"),
        ("4415af1d78b58c3f", "99999999999999980000"),
        ("444b1ae4d6e2ef50", "1e+21"),
        ("c3c0000000000000", "-2305843009213694000"),
    ],
)
def test_numbers_as_ecmascript_writes_them(bits: str, text: str) -> None:
    """Doubles are written as ECMAScript's Number.prototype.toString writes them."""
    (value,) = struct.unpack(">d", bytes.fromhex(bits))

    assert canonical_json(value) == text.encode()


def test_integers_and_integral_floats() -> None:
    """An integer is written as it is; a float with an integral value like an integer (1.0 is
    1); integers beyond 2**53 as the double they become."""
    assert canonical_json([2000, 1.0, -0.0, 2**53 - 1, 2**60 + 1]) == (
        b"[2000,1,0,9007199254740991,1152921504606847000]"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (float("nan"), "NaN"),
        ({"a": float("inf")}, "NaN and infinities"),
        ({1: "a"}, "keys must be strings"),
        ({"a": {1, 2}}, "unsupported type"),
        ("\ud800", "lone surrogate"),
        ({"\udc00": 1}, "lone surrogate"),
        (2**1100, "too large for a double"),
    ],
    ids=["nan", "infinity", "int-key", "set", "surrogate", "surrogate-key", "huge-int"],
)
def test_what_json_cannot_say_is_refused(value: Any, why: str) -> None:
    """NaN, infinities, non-string keys, other types, lone surrogates and integers beyond
    any double are InvalidArgument."""
    with pytest.raises(InvalidArgument, match=why):
        canonical_json(value)


def test_nesting_beyond_the_stack_is_refused() -> None:
    """JSON nested deeper than Python recurses (a forged schema) is InvalidArgument."""
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]

    with pytest.raises(InvalidArgument, match="nested too deeply"):
        canonical_json(deep)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


def _shuffled(value: Any, rng: random.Random) -> Any:
    """``value`` with the keys of every object inserted in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@given(JSON, st.integers(0, 2**32))
def test_key_order_never_matters(value: Any, seed: int) -> None:
    """The same JSON with its keys in any order has the same canonical form."""
    assert canonical_json(_shuffled(value, random.Random(seed))) == canonical_json(value)


@given(JSON)
def test_canonical_form_parses_back_to_itself(value: Any) -> None:
    """The canonical form is JSON, and canonicalizing what it parses to gives it again (so
    whoever re-encodes a fetched schema gets the same hash)."""
    text = canonical_json(value)

    assert canonical_json(json.loads(text)) == text


# --- the hash --------------------------------------------------------------------------------


def test_hash_is_sha256_of_the_canonical_pair() -> None:
    """``sha256:`` and the hex SHA-256 of ``{"input":...,"output":...}`` canonical: stable."""
    digest = schema_hash({"type": "object"}, {"type": "null"})

    canonical = b'{"input":{"type":"object"},"output":{"type":"null"}}'
    assert digest == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert digest == schema_hash({"type": "object"}, {"type": "null"})
    assert is_schema_hash(digest)


def test_hash_ignores_key_order_and_layout() -> None:
    """Two encodings of the same schemas (key order, whitespace, 1.0 against 1) hash alike."""
    a = json.loads('{"type": "object", "properties": {"x": {"maximum": 1.0, "type": "number"}}}')
    b = json.loads('{"properties":{"x":{"type":"number","maximum":1}},"type":"object"}')

    assert schema_hash(a, NULL_SCHEMA) == schema_hash(b, {"type": "null"})


def test_hash_changes_with_any_change() -> None:
    """Another constraint, or input and output swapped, is another hash."""
    one, other = {"type": "string", "maxLength": 2000}, {"type": "string", "maxLength": 2001}

    assert schema_hash(one, other) != schema_hash(other, one)
    assert schema_hash(one, one) != schema_hash(other, one)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("sha256:" + "0" * 64, True),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "0" * 63, False),
        ("sha512:" + "0" * 64, False),
        ("sha256:" + "0" * 64 + "\n", False),
        (None, False),
    ],
)
def test_what_a_schema_hash_looks_like(value: Any, ok: bool) -> None:
    assert is_schema_hash(value) is ok


# --- schemas from models ---------------------------------------------------------------------


def _agent() -> Agent:
    agent = Agent("calc")

    @agent.endpoint(idempotent=True)
    async def ask(q: Question) -> Answer:
        return Answer(text=q.text)

    @agent.endpoint
    async def count(q: Question) -> AsyncIterator[Token]:
        yield Token(index=0)

    @agent.endpoint
    async def forget(q: Question) -> None:
        return None

    return agent


def test_agent_schemas_come_from_its_models() -> None:
    """Input: the request model's validation schema; output: the reply model's serialization
    schema, the chunk model's for a streaming endpoint, ``{"type": "null"}`` for none."""
    schemas = _agent().schemas()

    ask, count, forget = schemas["ask"], schemas["count"], schemas["forget"]
    assert ask.input == Question.model_json_schema(mode="validation")
    assert ask.output == Answer.model_json_schema(mode="serialization")
    assert (ask.idempotent, ask.streams) == (True, False)
    assert count.output == Token.model_json_schema(mode="serialization")
    assert (count.idempotent, count.streams) == (False, True)
    assert forget.output == {"type": "null"}
    for s in schemas.values():
        assert s.hash == schema_hash(s.input, s.output)
    assert ask.input is not None and ask.input["properties"]["text"]["maxLength"] == 2000


def test_schemas_are_fresh_copies() -> None:
    """Changing a returned schema changes nothing for the next caller (or the hash)."""
    first = describe_endpoint("ask", Question, Answer)
    assert first.input is not None
    first.input["title"] = "changed"

    again = describe_endpoint("ask", Question, Answer)
    assert again.input is not None and again.input["title"] == "Question"
    assert again.hash == first.hash == schema_hash(again.input, again.output)


def test_published_texts_are_canonical() -> None:
    """What INFO serves for an endpoint is each schema's canonical JSON text."""
    published = publish_schemas(Question, None)

    assert published is not None
    assert published.input == canonical_json(Question.model_json_schema()).decode()
    assert published.output == '{"type":"null"}'
    assert published.hash == schema_hash(json.loads(published.input), NULL_SCHEMA)


def test_a_model_without_json_schema_is_unpublished() -> None:
    """An endpoint whose model pydantic cannot describe is served unpublished: no hash."""
    assert publish_schemas(Odd, None) is None
    assert describe_endpoint("odd", Odd, None, streams=True) == EndpointSchema(
        "odd", None, None, None, True, False
    )


def test_document_is_plain_json() -> None:
    """``EndpointSchema.document`` is what ``mesh-policy schemas -o json`` prints per endpoint."""
    doc = describe_endpoint("ask", Question, Answer, idempotent=True).document()

    assert list(doc) == ["name", "hash", "streams", "idempotent", "input", "output"]
    assert json.loads(json.dumps(doc)) == doc


# --- pins in the configuration ---------------------------------------------------------------

PIN = "sha256:" + "ab" * 32


def test_pins_default_empty_and_kept_as_a_copy() -> None:
    """No pins by default; the pins given are copied, so changing the dict later changes
    nothing; the configuration still hashes and pickles."""
    assert MeshConfig().schema_pins == {}
    given = {"researcher.answer": PIN}
    config = MeshConfig(schema_pins=given)
    given["researcher.answer"] = "sha256:" + "00" * 32

    assert config.schema_pins == {"researcher.answer": PIN}
    assert pickle.loads(pickle.dumps(config)) == config
    assert hash(config) == hash(MeshConfig(schema_pins={"x.y": PIN}))


@pytest.mark.parametrize(
    ("pins", "message"),
    [
        ({"researcher": PIN}, "key must be agent.endpoint"),
        ({"Researcher.answer": PIN}, "invalid agent name"),
        ({"researcher.an.swer": PIN}, "invalid endpoint name"),
        ({"researcher.answer": "sha256:ABC"}, "is not a schema hash"),
        ({"researcher.answer": PIN.removeprefix("sha256:")}, "is not a schema hash"),
    ],
)
def test_bad_pins_are_refused(pins: dict[str, str], message: str) -> None:
    """A pin whose key is not agent.endpoint, or whose value is not a schema hash, is refused."""
    with pytest.raises(InvalidArgument, match=message):
        MeshConfig(schema_pins=pins)
