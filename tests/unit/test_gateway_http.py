"""The HTTP gateway's pure parts: mesh errors as HTTP statuses and RFC 9457 problems, the
OpenAPI 3.1 document built from endpoint schemas, and the command's option types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import click
import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel, Field

import mesh
from mesh.bridges.openapi import ERROR_STATUSES, openapi_document
from mesh.bridges.problems import PROBLEM_JSON, problem_for, problem_schema
from mesh.cli.gateway import ByteSize, parse_listen
from mesh.errors import (
    Cancelled,
    CircuitOpen,
    DeadlineExceeded,
    DelegationRefused,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamBroken,
    Unauthenticated,
    Unavailable,
)

# --- statuses and problems ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidArgument("x"), 400),
        (PermissionDenied("x", rule="r"), 403),
        (DelegationRefused("x"), 403),
        (NotFound("x"), 404),
        (FailedPrecondition("x"), 409),
        (MessageTooLarge("x"), 413),
        (ResourceExhausted("x", retry_after=0.2), 429),
        (Cancelled("x"), 499),
        (Internal("x"), 500),
        (MeshError("x"), 500),
        (Unauthenticated("x"), 502),
        (StreamBroken("x"), 502),
        (Unavailable("x"), 503),
        (CircuitOpen("x", retry_after=3.0), 503),
        (DeadlineExceeded("x"), 504),
    ],
)
def test_each_mesh_error_has_its_status(exc: MeshError, status: int) -> None:
    problem = problem_for(exc, instance="/v1/a/b")
    assert problem.status == problem.body["status"] == status
    assert problem.body["instance"] == "/v1/a/b"
    assert problem.body["code"] == (exc.code if exc.code != "UNKNOWN" else "INTERNAL")
    assert problem.body["type"].startswith("urn:natsmesh:problem:")
    assert str(status) in ERROR_STATUSES or status == 499


def test_a_denial_names_the_rule() -> None:
    problem = problem_for(PermissionDenied("gateway may not call a.b: DENY", rule="no-guests"))
    assert problem.body == {
        "type": "urn:natsmesh:problem:permission-denied",
        "title": "Permission denied",
        "status": 403,
        "detail": "gateway may not call a.b: DENY",
        "code": "PERMISSION_DENIED",
        "rule": "no-guests",
    }
    assert problem.headers == {}


def test_a_rate_limit_says_when_to_retry_in_whole_seconds() -> None:
    problem = problem_for(ResourceExhausted("slow down", retry_after=0.2))
    assert problem.headers == {"Retry-After": "1"}
    assert problem.body["retry_after"] == 0.2
    assert problem_for(ResourceExhausted("x", retry_after=2.5)).headers["Retry-After"] == "3"
    assert "Retry-After" not in problem_for(ResourceExhausted("budget spent")).headers


def test_the_gateways_own_refusals_take_its_status_and_type() -> None:
    problem = problem_for(
        Unauthenticated("API key k was revoked"), status=401, kind="invalid-key", title="Bad key"
    )
    assert (problem.status, problem.body["type"], problem.body["title"]) == (
        401, "urn:natsmesh:problem:invalid-key", "Bad key",
    )  # fmt: skip
    assert problem.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert problem.code == "UNAUTHENTICATED"
    assert json.loads(problem.encoded())["detail"] == "API key k was revoked"


def test_an_internal_error_says_nothing_more_than_the_mesh_does() -> None:
    problem = problem_for(Internal(""))
    assert problem.body["detail"] == "the endpoint failed"


def test_the_problem_schema_lists_every_code_sent() -> None:
    schema = problem_schema()
    codes = set(schema["properties"]["code"]["enum"])
    assert {"PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "INTERNAL"} <= codes
    assert set(schema["required"]) == {"type", "title", "status", "detail", "code"}
    assert PROBLEM_JSON == "application/problem+json"


# --- OpenAPI ----------------------------------------------------------------------------------


class Leaf(BaseModel):
    name: str = Field(min_length=1)


class Tree(BaseModel):
    """A recursive model: pydantic's schema of it is a reference into its own definitions."""

    value: int
    children: list[Tree] = []
    leaf: Leaf | None = None


class Out(BaseModel):
    leaves: list[Leaf]


agent = mesh.Agent("forest")


@agent.endpoint()
async def grow(t: Tree) -> Out:
    return Out(leaves=[])


@agent.endpoint(idempotent=True)
async def count(t: Leaf) -> Leaf:
    return t


@agent.endpoint()
async def walk(t: Leaf) -> AsyncIterator[Leaf]:
    yield t


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


@pytest.fixture
def doc() -> dict[str, Any]:
    return openapi_document({"forest": agent.schemas()}, missing={"lost": "UNAVAILABLE: gone"})


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert sorted(doc["paths"]) == ["/v1/forest/count", "/v1/forest/grow", "/v1/forest/walk"]
    assert doc["x-mesh-missing"] == {"lost": "UNAVAILABLE: gone"}


def test_every_reference_resolves_and_no_defs_are_left(doc: dict[str, Any]) -> None:
    found = refs(doc)
    assert found
    for ref in found:
        resolve(doc, ref)
    assert '"$defs"' not in json.dumps(doc)


def test_the_schemas_are_the_published_ones_with_defs_moved(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    published = agent.schemas()["grow"]
    assert published.input is not None and "$defs" in published.input
    top = {k: v for k, v in published.input.items() if k != "$defs"}
    moved = json.loads(
        json.dumps(top).replace("#/$defs/", "#/components/schemas/forest.grow.input.")
    )
    assert schemas["forest.grow.input"] == moved
    for name, sub in published.input["$defs"].items():
        again = json.dumps(sub).replace("#/$defs/", "#/components/schemas/forest.grow.input.")
        assert schemas[f"forest.grow.input.{name}"] == json.loads(again)
    op = doc["paths"]["/v1/forest/grow"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/forest.grow.input"}
    assert op["x-mesh-schema-hash"] == published.hash


def test_a_streaming_endpoint_answers_server_sent_events(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/v1/forest/walk"]["post"]
    content = op["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    assert resolve(doc, content["text/event-stream"]["x-mesh-chunk"]["$ref"])["title"] == "Leaf"
    assert op["x-mesh-streams"] is True
    assert "IdempotencyKey" not in json.dumps(op["parameters"])


def test_errors_are_problems_and_the_key_is_a_bearer_token(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/v1/forest/count"]["post"]
    for status in ("400", "401", "403", "404", "413", "429", "500", "503", "504"):
        response = resolve(doc, op["responses"][status]["$ref"])
        schema = response["content"]["application/problem+json"]["schema"]
        assert resolve(doc, schema["$ref"]) == problem_schema()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "mgk_<id>_<secret>",
    }
    assert schemes["apiKey"]["name"] == "X-API-Key"
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    names = [resolve(doc, p["$ref"])["name"] for p in op["parameters"]]
    assert names == ["X-Mesh-Timeout", "traceparent", "tracestate", "Idempotency-Key"]


def test_an_endpoint_without_published_schemas_takes_any_json() -> None:
    schema = mesh.EndpointSchema("raw", None, None, None)
    doc = openapi_document({"old": {"raw": schema}})
    validate(doc)
    op = doc["paths"]["/v1/old/raw"]["post"]
    assert "not published" in op["description"]
    assert doc["components"]["schemas"]["old.raw.input"] == {}


# --- the command's options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1 << 20), ("512KiB", 512 << 10), ("65536", 65536), ("2 mb", 2_000_000),
     ("10kB", 10_000), ("7b", 7)],
)  # fmt: skip
def test_sizes_take_binary_and_decimal_units(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1GiB", "one MiB"])
def test_other_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a size"):
        ByteSize().convert(text, None, None)


def test_listen_is_host_and_port() -> None:
    assert parse_listen("127.0.0.1:8480") == ("127.0.0.1", 8480)
    assert parse_listen(":0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        parse_listen("8480")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["issue", "bob"], "InvalidArgument: principal 'bob' must look like kind:name"),
        (["issue", "user:bob", "--roles", "Bad"], "InvalidArgument: role 'Bad' must match"),
        (["issue", "user:bob", "--ttl", "400d"], "InvalidArgument: ttl: Input should be less"),
        (["revoke", "xyz"], "InvalidArgument: 'xyz' is not a gateway key id"),
    ],
)
def test_gateway_key_commands_refuse_bad_arguments_before_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mesh.cli import policy as policy_cli

    assert policy_cli.main(["gateway-key", *argv, "--servers", "nats://127.0.0.1:1"]) == 2
    assert message in capsys.readouterr().err
