"""The MCP bridges' translations, without a server: tool names to endpoint names, tool schemas
to published models, endpoint schemas to tools, mesh errors to tool errors
(``mesh/bridges/mcp_serve.py``, ``mesh/bridges/mcp_wrap.py``; end to end:
``tests/integration/test_mcp.py``)."""

from __future__ import annotations

from typing import Any

import mcp.types as types
import pytest
from pydantic import BaseModel, ValidationError

import mesh
from mesh._core.schemas import publish_schemas, schema_hash
from mesh.bridges.mcp_serve import ToolTarget, parse_selection, tool_error
from mesh.bridges.mcp_wrap import (
    McpServerSpec,
    ToolOutput,
    endpoint_name,
    schema_model,
    wrap_tools,
)

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
    "required": ["a", "b"],
    "title": "addArguments",
}


@pytest.mark.parametrize(
    ("tool", "endpoint"),
    [
        ("add", "add"),
        ("getWeather", "getweather"),
        ("Shout.Text", "shout-text"),
        ("files/read  all", "files-read-all"),
        ("__private", "private"),
        ("...", "tool"),
        ("x" * 80, "x" * 63),
    ],
)
def test_tool_names_become_valid_endpoint_names(tool: str, endpoint: str) -> None:
    """Lower-cased, other characters to '-', leading '-' and '_' dropped, 63 at most."""
    assert endpoint_name(tool) == endpoint


def test_tool_names_that_collide_get_a_number() -> None:
    """A name taken by an earlier tool gets -2, -3, ..."""
    taken: set[str] = set()
    assert [endpoint_name(n, taken) for n in ("Add", "add", "ADD")] == ["add", "add-2", "add-3"]


def test_a_tool_model_publishes_the_tools_schema_and_validates_against_it() -> None:
    """The hash a wrapped endpoint's record carries is that of the tool's own schema."""
    model = schema_model("AddInput", ADD)
    assert model.model_validate_json('{"a": 1, "b": 2}').root == {"a": 1, "b": 2}
    with pytest.raises(ValidationError, match="b: -1 is less than the minimum of 0"):
        model.model_validate({"a": 1, "b": -1})
    with pytest.raises(ValidationError, match="'b' is a required property"):
        model.model_validate({"a": 1})
    published = publish_schemas(model, ToolOutput)
    assert published is not None
    assert published.hash == schema_hash(ADD, ToolOutput.model_json_schema(mode="serialization"))


def test_an_invalid_tool_schema_is_refused_unless_unchecked() -> None:
    """A schema that is not JSON Schema: InvalidArgument, or a model that only publishes it."""
    with pytest.raises(mesh.InvalidArgument, match="not a valid JSON Schema"):
        schema_model("Bad", {"type": 12})
    assert schema_model("Bad", {"type": 12}, validate=False).model_validate("x").root == "x"


def test_wrapped_tools_are_endpoints_with_the_tools_schemas() -> None:
    """wrap_tools: one endpoint per tool; the output schema is the tool's when it has one."""
    tools = [
        types.Tool(
            name="add",
            input_schema=ADD,
            output_schema={"type": "object", "properties": {"result": {"type": "integer"}}},
            annotations=types.ToolAnnotations(idempotent_hint=True),
        ),
        types.Tool(name="Shout.Text", input_schema={"type": "object"}),
    ]
    agent = wrap_tools("tools", None, tools)  # type: ignore[arg-type]  # never called here
    schemas = agent.schemas()
    assert sorted(schemas) == ["add", "shout-text"]
    assert schemas["add"].input == ADD and schemas["add"].idempotent
    assert schemas["add"].output == tools[0].output_schema
    assert schemas["shout-text"].output == ToolOutput.model_json_schema(mode="serialization")
    assert not schemas["shout-text"].idempotent


def test_a_server_is_a_command_or_a_url() -> None:
    """Exactly one of --command and --url, and a URL is http(s)."""
    with pytest.raises(mesh.InvalidArgument, match="exactly one"):
        McpServerSpec()
    with pytest.raises(mesh.InvalidArgument, match="exactly one"):
        McpServerSpec(command="x", url="http://h/mcp")
    with pytest.raises(mesh.InvalidArgument, match="not an http"):
        McpServerSpec(url="ftp://h")


class Chunk(BaseModel):
    index: int


def target(output: dict[str, Any] | None, streams: bool = False) -> ToolTarget:
    schema = mesh.EndpointSchema("ep", {"type": "object"}, output, "sha256:" + "0" * 64, streams)
    return ToolTarget("agent", "ep", schema)


def test_an_object_reply_is_the_structured_content_itself() -> None:
    """A reply that is an object: outputSchema and structured content as they are."""
    t = target({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert t.tool().name == "agent.ep"
    assert t.tool().output_schema == {"type": "object", "properties": {"x": {"type": "integer"}}}
    result = t.result({"x": 1})
    assert result.structured_content == {"x": 1} and not result.is_error


def test_a_reply_that_is_not_an_object_is_wrapped_in_result() -> None:
    """MCP's structured content is an object: other replies go in {"result": ...}."""
    t = target({"type": "array", "items": {"$ref": "#/$defs/X"}, "$defs": {"X": {}}})
    assert t.output_schema() == {
        "type": "object",
        "properties": {"result": {"type": "array", "items": {"$ref": "#/$defs/X"}}},
        "required": ["result"],
        "$defs": {"X": {}},
    }
    assert t.result([1]).structured_content == {"result": [1]}
    assert target({"type": "null"}).output_schema() is None


def test_a_stream_is_the_list_of_its_chunks() -> None:
    """A streaming endpoint's tool answers {"chunks": [...]}, the chunk schema as items."""
    chunk = Chunk.model_json_schema(mode="serialization")
    t = target(chunk, streams=True)
    out = t.output_schema()
    assert out is not None and out["properties"]["chunks"]["items"] == chunk
    assert t.result([{"index": 0}]).structured_content == {"chunks": [{"index": 0}]}


def test_a_mesh_error_is_a_tool_error_naming_its_type_and_rule() -> None:
    """isError, with ``ErrorType: message`` and the rule when the message does not name it."""
    denied = tool_error(mesh.PermissionDenied('DENY by rule "r1"', rule="r1"))
    assert denied.is_error
    assert denied.content[0].text == 'PermissionDenied: DENY by rule "r1"'  # type: ignore[union-attr]
    bare = tool_error(mesh.PermissionDenied("refused", rule="r2"))
    assert bare.content[0].text == "PermissionDenied: refused (rule 'r2')"  # type: ignore[union-attr]


def test_the_selection_takes_comma_separated_tools_and_agents() -> None:
    """--tools a.b,c.d and --agents x; bad names and an empty choice are refused."""
    chosen = parse_selection(["researcher.answer, librarian.lookup"], ["writer"])
    assert chosen.tools == (("researcher", "answer"), ("librarian", "lookup"))
    assert chosen.agents_to_ask() == ["writer", "researcher", "librarian"]
    with pytest.raises(mesh.InvalidArgument, match=r"AGENT\.ENDPOINT"):
        parse_selection(["researcher"])
    with pytest.raises(mesh.InvalidArgument, match="no tools chosen"):
        parse_selection([""], [""])


def test_a_calls_principal_is_the_requests_own_else_the_bridges() -> None:
    """principal_of (a gateway's authenticated request) wins over --principal; none: direct."""
    from types import SimpleNamespace

    from mesh.bridges.mcp_serve import McpBridge

    chosen = parse_selection(["calc.add"])
    fixed = McpBridge(None, chosen, principal="user:desk")  # type: ignore[arg-type]
    per_request = McpBridge(
        None,  # type: ignore[arg-type]
        chosen,
        principal="user:desk",
        principal_of=lambda request: request and request.headers.get("x-user"),
    )
    http = SimpleNamespace(request=SimpleNamespace(headers={"x-user": "user:bob"}))
    stdio = SimpleNamespace(request=None)
    assert fixed._delegate(http) == mesh.Delegate(origin="user:desk")  # type: ignore[arg-type]
    assert per_request._delegate(http) == mesh.Delegate(origin="user:bob")  # type: ignore[arg-type]
    assert per_request._delegate(stdio) == mesh.Delegate(origin="user:desk")  # type: ignore[arg-type]
    assert McpBridge(None, chosen)._delegate(stdio) is None  # type: ignore[arg-type]
    with pytest.raises(mesh.InvalidArgument, match="kind:name"):
        McpBridge(None, chosen, principal="alice")  # type: ignore[arg-type]
