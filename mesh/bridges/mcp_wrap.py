"""An external MCP server wrapped as a mesh agent (``mesh-agent mcp-wrap``, ``docs/mcp.md``):
connected to with the official ``mcp`` SDK's client (stdio or streamable HTTP), its tools,
listed once at start, become the endpoints of a mesh agent, so mesh policy, rate limits, audit,
access logs and tracing govern which agents may use which tools.

What maps to what:

- **names**: a tool's endpoint is its name made a valid mesh name (``endpoint_name``):
  lower-cased, each run of characters other than ``a-z``, ``0-9``, ``_`` and ``-`` replaced
  by one ``-``, leading ``-`` and ``_`` dropped, cut to 63 characters (``tool`` if nothing is
  left); a name taken by an earlier tool gets ``-2``, ``-3``, ... .
- **schemas**: the endpoint's published input schema is the tool's ``inputSchema``, exactly,
  and requests are validated against it (``jsonschema``) before the tool is called; its
  output schema is the tool's ``outputSchema`` when it has one (the reply is then the tool's
  structured content), else that of ``ToolOutput`` (the text and content blocks). The models
  publish those schemas by overriding pydantic's ``model_json_schema`` (``docs/protocol.md``
  section 19), so the hash in the signed record is the hash of the tool's own schemas.
- **errors**: a tool error (``isError``) is ``FailedPrecondition`` with the tool's text (the
  callee worked as designed: it trips no circuit); a JSON-RPC error from the server is
  ``InvalidArgument`` for invalid params, else ``Internal``, with its message; a server that
  went away is ``Unavailable``; no answer by the call's deadline is ``DeadlineExceeded``.
- **progress and cancellation**: the tool's progress notifications are the handler's
  ``ctx.progress`` (the fraction when the tool gives a total, else 0), and a cancelled mesh
  call cancels the MCP request (the SDK sends ``notifications/cancelled``).
"""

from __future__ import annotations

import contextlib
import copy
import re
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import mcp.types as types
from jsonschema import SchemaError
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client.session import IncomingMessage, MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import BaseModel, RootModel, model_validator

from mesh import (
    Agent,
    Context,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
)
from mesh._log import get_logger

__all__ = [
    "McpServerSpec",
    "ToolOutput",
    "endpoint_name",
    "list_all_tools",
    "mcp_session",
    "schema_model",
    "wrap_tools",
]

log = get_logger("mesh.bridges.mcp_wrap")

_NOT_NAME = re.compile(r"[^a-z0-9_-]+")
_MAX_NAME = 63


def endpoint_name(tool: str, taken: set[str] | None = None) -> str:
    """The mesh endpoint name of the MCP tool ``tool`` (the rule is in the module's
    docstring); with ``taken``, made unique among those names (and added to them)."""
    name = _NOT_NAME.sub("-", tool.lower()).lstrip("-_")[:_MAX_NAME].rstrip("-") or "tool"
    if taken is None:
        return name
    unique, n = name, 1
    while unique in taken:
        n += 1
        suffix = f"-{n}"
        unique = name[: _MAX_NAME - len(suffix)] + suffix
    taken.add(unique)
    return unique


class ToolOutput(BaseModel):
    """The reply of a tool that declares no output schema.

    Attributes:
        text: its text content blocks, joined by newlines.
        content: every content block as MCP sent it (``{"type": "text", "text": ...}``,
            images and audio base64-encoded, ...).
    """

    text: str
    content: list[dict[str, Any]]


class _SchemaModel(RootModel[Any]):
    """Any JSON value, checked against the class's ``__mesh_checker__`` (if any), publishing
    ``__mesh_schema__`` as its JSON Schema."""

    __mesh_schema__: ClassVar[dict[str, Any]] = {}
    __mesh_checker__: ClassVar[Any] = None

    @model_validator(mode="after")
    def _valid(self) -> _SchemaModel:
        checker = type(self).__mesh_checker__
        if checker is not None:
            error = best_match(checker.iter_errors(self.root))
            if error is not None:
                where = "/".join(map(str, error.absolute_path)) or "(the arguments)"
                raise ValueError(f"{where}: {error.message}")
        return self

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The declared schema, whatever the mode: what ``publish_schemas`` publishes."""
        return copy.deepcopy(cls.__mesh_schema__)


def schema_model(
    name: str, schema: dict[str, Any], *, validate: bool = True
) -> type[RootModel[Any]]:
    """A pydantic model of any JSON value that publishes ``schema`` as its JSON Schema (in
    both modes) and, with ``validate``, accepts only values valid against it.

    Raises:
        InvalidArgument: ``schema`` is not a valid JSON Schema (with ``validate``).
    """
    published = copy.deepcopy(schema)
    checker = None
    if validate:
        cls = validator_for(published)
        try:
            cls.check_schema(published)
        except SchemaError as exc:
            raise InvalidArgument(f"{name}: not a valid JSON Schema: {exc.message}") from None
        checker = cls(published)
    namespace = {"__mesh_schema__": published, "__mesh_checker__": checker, "__module__": __name__}
    return type(name, (_SchemaModel,), namespace)


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """Where the MCP server is: a command to run (stdio) or a streamable HTTP URL.

    Attributes:
        command: the command line, split as a POSIX shell would (``python server.py``).
        url: the server's streamable HTTP endpoint (``http://127.0.0.1:8000/mcp``).
        cwd: the working directory of the command.
        env: variables added to the command's environment.
    """

    command: str | None = None
    url: str | None = None
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise InvalidArgument("give the MCP server as exactly one of --command or --url")
        if self.command is not None and not shlex.split(self.command):
            raise InvalidArgument("--command is empty")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise InvalidArgument(f"--url {self.url!r} is not an http:// or https:// URL")

    def describe(self) -> str:
        """For logs and errors."""
        return self.url if self.url is not None else f"`{self.command}`"


def _tools_changed(on_change: Callable[[], None]) -> MessageHandlerFnT:
    async def handle(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            on_change()
        await anyio.lowlevel.checkpoint()

    return handle


def _warn_tools_changed() -> None:
    log.warning(
        "mcp_wrap.tools_changed",
        note="the MCP server's tools changed; restart mesh-agent mcp-wrap to serve the new list",
    )


@contextlib.asynccontextmanager
async def mcp_session(
    spec: McpServerSpec,
    *,
    timeout: float = 30.0,
    on_tools_changed: Callable[[], None] = _warn_tools_changed,
) -> AsyncIterator[ClientSession]:
    """Connect to the MCP server and initialize the session (the server's stderr goes to ours).

    Args:
        spec: where the server is.
        timeout: seconds for the server to answer ``initialize``.
        on_tools_changed: called when the server says its tools changed
            (``notifications/tools/list_changed``); by default a warning is logged, since the
            agent's endpoints are fixed while it runs.

    Raises:
        Unavailable: the command cannot be started, or the server does not answer
            ``initialize`` (in time).
    """
    handler = _tools_changed(on_tools_changed)
    async with contextlib.AsyncExitStack() as stack:
        try:
            if spec.command is not None:
                argv = shlex.split(spec.command)
                params = StdioServerParameters(
                    command=argv[0], args=argv[1:], env=spec.env or None, cwd=spec.cwd
                )
                read, write = await stack.enter_async_context(stdio_client(params, sys.stderr))
            else:
                assert spec.url is not None
                read, write = await stack.enter_async_context(streamable_http_client(spec.url))
            session = await stack.enter_async_context(
                ClientSession(read, write, message_handler=handler)
            )
            with anyio.fail_after(timeout):
                await session.initialize()
        except TimeoutError:
            raise Unavailable(
                f"the MCP server {spec.describe()} did not answer initialize within {timeout:g}s"
            ) from None
        except (OSError, MCPError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise Unavailable(f"cannot reach the MCP server {spec.describe()}: {exc}") from None
        yield session


async def list_all_tools(session: ClientSession, *, timeout: float = 30.0) -> list[types.Tool]:
    """Every tool of the server, following its pagination.

    Raises:
        Unavailable: the server did not list them within ``timeout`` seconds, or failed to.
    """
    tools: list[types.Tool] = []
    cursor: str | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                page = await session.list_tools(
                    params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
                )
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    return tools
    except TimeoutError:
        raise Unavailable(f"the MCP server did not list its tools within {timeout:g}s") from None
    except MCPError as exc:
        raise Unavailable(f"the MCP server failed to list its tools: {exc.message}") from None


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def _tool_handler(
    session: ClientSession,
    tool: types.Tool,
    input_model: type[RootModel[Any]],
    output_model: type[BaseModel],
    structured: bool,
) -> Callable[[RootModel[Any], Context], Awaitable[BaseModel]]:
    async def call(body: RootModel[Any], ctx: Context) -> BaseModel:
        async def relay(progress: float, total: float | None, message: str | None) -> None:
            fraction = min(1.0, max(0.0, progress / total)) if total else 0.0
            with contextlib.suppress(InvalidArgument):
                await ctx.progress(fraction, (message or "")[:256])

        try:
            result = await session.call_tool(
                tool.name,
                body.root,
                read_timeout_seconds=ctx.remaining,
                progress_callback=relay,
            )
        except MCPError as exc:
            if exc.code == types.INVALID_PARAMS:
                raise InvalidArgument(f"tool {tool.name}: {exc.message}") from None
            if exc.code == CONNECTION_CLOSED:
                raise Unavailable(f"the MCP server of tool {tool.name} is gone") from None
            if exc.code == REQUEST_TIMEOUT:
                raise DeadlineExceeded(f"tool {tool.name}: no answer by the deadline") from None
            raise Internal(f"tool {tool.name}: MCP error {exc.code}: {exc.message}") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            raise Unavailable(f"the MCP server of tool {tool.name} is gone") from None
        except RuntimeError as exc:  # the SDK's check of structured content against the schema
            raise Internal(f"tool {tool.name}: {exc}") from None
        if result.is_error:
            raise FailedPrecondition(f"tool {tool.name} failed: {_text(result) or 'no message'}")
        if structured:
            return output_model.model_validate(result.structured_content)
        return ToolOutput(
            text=_text(result),
            content=[
                c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in result.content
            ],
        )

    return call


def wrap_tools(
    name: str,
    session: ClientSession,
    tools: list[types.Tool],
    *,
    version: str = "0.0.0",
    labels: dict[str, str] | None = None,
) -> Agent:
    """A mesh agent ``name`` whose endpoints call ``tools`` through ``session``.

    An endpoint is idempotent (callers retry it) when its tool's ``idempotentHint`` says so.
    A tool whose input schema is not a valid JSON Schema is served without local validation
    (the MCP server still validates), logged as a warning.

    Raises:
        InvalidArgument: ``name`` is not a valid agent name.
    """
    agent = Agent(name, version=version, labels={"bridge": "mcp", **(labels or {})})
    taken: set[str] = set()
    for tool in tools:
        endpoint = endpoint_name(tool.name, taken)
        model_name = "".join(p.capitalize() for p in re.split(r"[-_]", endpoint) if p) or "Tool"
        try:
            given = schema_model(f"{model_name}Input", tool.input_schema)
        except InvalidArgument as exc:
            log.warning("mcp_wrap.schema_invalid", tool=tool.name, error=exc.message)
            given = schema_model(f"{model_name}Input", tool.input_schema, validate=False)
        structured = tool.output_schema is not None
        answered: type[BaseModel] = (
            schema_model(f"{model_name}Output", tool.output_schema, validate=False)
            if tool.output_schema is not None
            else ToolOutput
        )
        handler = _tool_handler(session, tool, given, answered, structured)
        handler.__annotations__ = {"body": given, "ctx": Context, "return": answered}
        handler.__name__ = handler.__qualname__ = endpoint.replace("-", "_")
        handler.__doc__ = tool.description
        # The server's own hint: a tool it calls idempotent may be retried by mesh callers.
        idempotent = bool(tool.annotations and tool.annotations.idempotent_hint)
        agent.endpoint(name=endpoint, idempotent=idempotent)(handler)
        if endpoint != tool.name:
            log.info("mcp_wrap.renamed", tool=tool.name, endpoint=endpoint)
    return agent
