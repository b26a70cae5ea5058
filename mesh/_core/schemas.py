"""Published endpoint schemas: the JSON Schemas of an endpoint's input and output, their
canonical encoding and the hash a directory record carries (``docs/protocol.md`` section 19,
"Endpoint schemas").

The hash is ``"sha256:" + hex(SHA-256(JCS({"input": <input schema>, "output": <output
schema>})))``, JCS being the JSON Canonicalization Scheme (RFC 8785): keys sorted by their
UTF-16 code units, no whitespace, numbers as ECMAScript prints them, UTF-8. Anyone can
recompute it from the schemas however they were encoded, so a schema fetched from an untrusted
place (the ``$SRV`` INFO reply) is checked against the signed record. The input schema is
pydantic's validation schema of the request model, the output schema the serialization schema
of the reply model (of the chunk model for a streaming endpoint), ``{"type": "null"}`` for an
endpoint that returns nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import rfc8785
from pydantic import BaseModel

from mesh._log import get_logger
from mesh.errors import InvalidArgument

__all__ = [
    "HASH_PREFIX",
    "NULL_SCHEMA",
    "EndpointSchema",
    "Published",
    "canonical_json",
    "describe_endpoint",
    "is_schema_hash",
    "publish_schemas",
    "schema_hash",
]

log = get_logger(__name__)

HASH_PREFIX = "sha256:"
NULL_SCHEMA: dict[str, Any] = {"type": "null"}
"""The output schema of an endpoint that returns nothing (its reply is JSON ``null``)."""

_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def is_schema_hash(value: object) -> bool:
    """Whether ``value`` is a schema hash as records carry it: ``sha256:`` and 64 lowercase
    hex digits."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def canonical_json(value: Any) -> bytes:
    """``value`` in the JSON Canonicalization Scheme (RFC 8785), as UTF-8 (by the ``rfc8785``
    package).

    ``value`` is what ``json.loads`` returns: dicts with string keys, lists (or tuples),
    strings, integers, floats, booleans and ``None``.

    Raises:
        InvalidArgument: ``value`` holds something JCS cannot represent (a non-string key, a
            NaN or infinity, an integer beyond any double, a lone surrogate, another type).
    """
    try:
        try:
            return rfc8785.dumps(value)
        except rfc8785.IntegerDomainError:
            # JSON parsers read a large integer as the double it rounds to (a float written
            # canonically, 1e16, parses back as an int): write it as that double.
            return rfc8785.dumps(_big_ints_as_doubles(value))
    except rfc8785.FloatDomainError:
        raise InvalidArgument("not canonical JSON: NaN and infinities have no JSON form") from None
    except UnicodeEncodeError:
        raise InvalidArgument("not canonical JSON: a string holds a lone surrogate") from None
    except RecursionError:
        raise InvalidArgument("not canonical JSON: nested too deeply") from None
    except rfc8785.CanonicalizationError as exc:
        if "non-UTF-8" in str(exc):
            raise InvalidArgument("not canonical JSON: a string holds a lone surrogate") from None
        raise InvalidArgument(f"not canonical JSON: {exc}") from None


def _big_ints_as_doubles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _big_ints_as_doubles(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints_as_doubles(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        try:
            return float(value)
        except OverflowError:
            raise InvalidArgument("not canonical JSON: an integer too large for a double") from None
    return value


def schema_hash(input_schema: Any, output_schema: Any) -> str:
    """The hash of an endpoint's schemas, as its directory record carries it.

    Raises:
        InvalidArgument: a schema is not JSON (``canonical_json``).
    """
    document = canonical_json({"input": input_schema, "output": output_schema})
    return HASH_PREFIX + hashlib.sha256(document).hexdigest()


class Published(NamedTuple):
    """An endpoint's schemas as published: each one's canonical JSON text, and the hash."""

    input: str
    output: str
    hash: str


@functools.lru_cache(maxsize=1024)
def publish_schemas(
    input_type: type[BaseModel], output_type: type[BaseModel] | None
) -> Published | None:
    """The published schemas of an endpoint taking ``input_type`` and answering with
    ``output_type`` (``None``: nothing), computed once per pair of models.

    Returns ``None``, logging a warning once, when pydantic cannot make a JSON Schema of a
    model (an arbitrary type in a field): the endpoint is served, unpublished and unpinnable.
    """
    try:
        given = input_type.model_json_schema(mode="validation")
        answered = (
            output_type.model_json_schema(mode="serialization")
            if output_type is not None
            else NULL_SCHEMA
        )
        return Published(
            canonical_json(given).decode(),
            canonical_json(answered).decode(),
            schema_hash(given, answered),
        )
    except Exception as exc:  # pydantic's PydanticInvalidForJsonSchema and friends
        log.warning(
            "mesh.schema_unavailable",
            input=input_type.__qualname__,
            output=getattr(output_type, "__qualname__", None),
            error_type=type(exc).__name__,
        )
        return None


@dataclass(frozen=True, slots=True)
class EndpointSchema:
    """An endpoint's published schemas (``Agent.schemas``, ``Mesh.schemas``).

    Attributes:
        name: the endpoint.
        input: the JSON Schema of its request body.
        output: the JSON Schema of its reply, or of each chunk when it ``streams``.
        hash: ``sha256:<hex>`` over both (``docs/protocol.md`` section 19): what a caller
            pins (``MeshConfig.schema_pins``).
        streams: it answers with a stream of chunks (``Mesh.stream``).
        idempotent: it is safe to run twice (callers retry it).

    ``input``, ``output`` and ``hash`` are ``None`` for an endpoint whose schemas are not
    published: an instance of an older natsmesh, or a model pydantic makes no JSON Schema of.
    """

    name: str
    input: dict[str, Any] | None
    output: dict[str, Any] | None
    hash: str | None
    streams: bool = False
    idempotent: bool = False

    def document(self) -> dict[str, Any]:
        """As plain JSON data: ``{name, hash, streams, idempotent, input, output}``."""
        return {
            "name": self.name,
            "hash": self.hash,
            "streams": self.streams,
            "idempotent": self.idempotent,
            "input": self.input,
            "output": self.output,
        }


def describe_endpoint(
    name: str,
    input_type: type[BaseModel],
    output_type: type[BaseModel] | None,
    *,
    streams: bool = False,
    idempotent: bool = False,
) -> EndpointSchema:
    """The ``EndpointSchema`` of an endpoint declared with these models (fresh dicts each
    call: the caller may change them)."""
    published = publish_schemas(input_type, output_type)
    if published is None:
        return EndpointSchema(name, None, None, None, streams, idempotent)
    return EndpointSchema(
        name,
        json.loads(published.input),
        json.loads(published.output),
        published.hash,
        streams,
        idempotent,
    )
