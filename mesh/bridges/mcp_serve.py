"""Mesh endpoints as MCP tools: an MCP server, on the official ``mcp`` SDK's low-level
``Server``, whose tools are chosen endpoints of mesh agents (``mesh-agent mcp``,
``docs/mcp.md``).

What maps to what:

- **tools/list**: one tool per chosen endpoint, named ``agent.endpoint`` (mesh names have no
  dots, so the name is unambiguous); ``inputSchema`` is the endpoint's published input schema
  and ``outputSchema`` its output schema (wrapped in ``{"result": ...}`` when it is not an
  object, as MCP requires; ``{"chunks": [...]}`` for a streaming endpoint), both verified
  against the signed directory record by ``Mesh.schemas``.
- **tools/call**: a mesh request with the arguments as its JSON body, made by the bridge's own
  identity (on behalf of an external principal, ``Delegate(origin=...)``, when one is named
  and the bridge has the role ``gateway``); the reply comes back as structured content and as
  its JSON text.
- **errors**: a ``MeshError`` becomes a tool error (``isError: true``) whose text is
  ``ErrorType: message`` (a denial names its rule); anything else is logged here and the
  client is told only that the bridge failed. Never a traceback.
- **cancellation**: ``notifications/cancelled`` cancels the handler's task (the SDK does), so
  the mesh call is cancelled and the mesh cancels it at the callee and down its call tree.
- **progress**: with a ``progressToken``, each mesh progress report (``ctx.progress``) is a
  ``notifications/progress`` (``progress`` = the fraction, ``total`` = 1); for a streaming
  endpoint each chunk is one too (``progress`` counts the notifications, ``message`` is the
  chunk's JSON), and the result is the collected chunks.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mcp.types as types
from mcp.server.lowlevel import Server
from pydantic import RootModel

from mesh import Delegate, EndpointSchema, InvalidArgument, MeshError, Progress
from mesh._core.names import validate_name
from mesh._log import get_logger

if TYPE_CHECKING:
    from mcp.server.context import ServerRequestContext
    from mcp.server.session import ServerSession
    from mcp.shared._stream_protocols import ReadStream, WriteStream
    from mcp.shared.message import SessionMessage
    from starlette.applications import Starlette

    from mesh import Mesh

__all__ = [
    "JsonBody",
    "McpBridge",
    "ToolSelection",
    "ToolTarget",
    "mcp_asgi_app",
    "parse_selection",
    "tool_error",
]

log = get_logger("mesh.bridges.mcp")

SCHEMA_TIMEOUT = 3.0
"""Seconds ``tools/list`` waits for one agent's schemas before leaving its tools out."""
_OBJECT: dict[str, Any] = {"type": "object"}


class JsonBody(RootModel[Any]):
    """Any JSON value, sent as it is and received as it came (a mesh body without a model)."""


@dataclass(frozen=True, slots=True)
class ToolSelection:
    """Which endpoints the bridge serves: ``agent.endpoint`` names and whole agents.

    Attributes:
        tools: ``(agent, endpoint)`` pairs, in the order given.
        agents: agents all of whose endpoints are served.
    """

    tools: tuple[tuple[str, str], ...] = ()
    agents: tuple[str, ...] = ()

    def agents_to_ask(self) -> list[str]:
        """Every agent whose schemas are needed, each once, in order."""
        seen = dict.fromkeys([*self.agents, *(a for a, _ in self.tools)])
        return list(seen)


def parse_selection(tools: Iterable[str] = (), agents: Iterable[str] = ()) -> ToolSelection:
    """``researcher.answer``-style names and agent names as a ``ToolSelection``.

    Each item may itself be a comma-separated list (``--tools a.b,c.d``).

    Raises:
        InvalidArgument: a name that is not ``agent.endpoint`` of valid mesh names, or nothing
            chosen at all.
    """
    pairs: list[tuple[str, str]] = []
    for item in _split(tools):
        agent, dot, endpoint = item.partition(".")
        if not dot:
            raise InvalidArgument(f"tool {item!r} is not AGENT.ENDPOINT (e.g. researcher.answer)")
        pair = (validate_name("agent", agent), validate_name("endpoint", endpoint))
        if pair not in pairs:
            pairs.append(pair)
    names = [validate_name("agent", a) for a in _split(agents)]
    if not pairs and not names:
        raise InvalidArgument("no tools chosen: pass --tools AGENT.ENDPOINT,... or --agents NAME")
    return ToolSelection(tuple(pairs), tuple(dict.fromkeys(names)))


def _split(items: Iterable[str]) -> list[str]:
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _hoisted(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``schema`` without its ``$defs``, and the ``$defs``: to nest it under another root,
    which then carries them (pydantic's ``#/$defs/...`` references resolve from the root)."""
    inner = copy.deepcopy(schema)
    defs = inner.pop("$defs", {})
    return inner, defs


@dataclass(frozen=True, slots=True)
class ToolTarget:
    """One mesh endpoint served as an MCP tool.

    Attributes:
        agent / endpoint: what it calls.
        schema: the endpoint's verified published schemas.
    """

    agent: str
    endpoint: str
    schema: EndpointSchema

    @property
    def name(self) -> str:
        """The tool's name: ``agent.endpoint``."""
        return f"{self.agent}.{self.endpoint}"

    @property
    def wraps_result(self) -> bool:
        """Whether the structured result is ``{"result": reply}`` (a reply that is not a JSON
        object; MCP's structured content is an object)."""
        out = self.schema.output
        return (
            not self.schema.streams
            and out is not None
            and out != {"type": "null"}
            and out.get("type") != "object"
        )

    def input_schema(self) -> dict[str, Any]:
        """The tool's ``inputSchema``: the endpoint's input schema (``{"type": "object"}``,
        anything, when it publishes none); ``type: object`` is added at the root when pydantic
        wrote only a ``$ref`` there, since MCP requires it."""
        given = copy.deepcopy(self.schema.input) if self.schema.input is not None else {}
        if given.get("type") is None:
            given["type"] = "object"
        return given

    def output_schema(self) -> dict[str, Any] | None:
        """The tool's ``outputSchema``, or ``None`` when the endpoint answers ``null`` or
        publishes no schema."""
        out = self.schema.output
        if out is None or out == {"type": "null"}:
            return None
        if self.schema.streams:
            items, defs = _hoisted(out)
            wrapped: dict[str, Any] = {
                "type": "object",
                "properties": {"chunks": {"type": "array", "items": items}},
                "required": ["chunks"],
            }
        elif self.wraps_result:
            inner, defs = _hoisted(out)
            wrapped = {"type": "object", "properties": {"result": inner}, "required": ["result"]}
        else:
            return copy.deepcopy(out)
        if defs:
            wrapped["$defs"] = defs
        return wrapped

    def tool(self) -> types.Tool:
        """The ``Tool`` that ``tools/list`` shows."""
        about = (self.schema.input or {}).get("description")
        described = f"The mesh endpoint {self.name}" + (
            " (it streams: each chunk is reported as progress; the result is every chunk)"
            if self.schema.streams
            else ""
        )
        return types.Tool(
            name=self.name,
            description=f"{about}\n\n{described}." if isinstance(about, str) else described + ".",
            input_schema=self.input_schema(),
            output_schema=self.output_schema(),
            annotations=types.ToolAnnotations(idempotent_hint=self.schema.idempotent),
        )

    def result(self, value: Any) -> types.CallToolResult:
        """The ``CallToolResult`` of a reply (for a stream: the list of its chunks)."""
        if self.schema.streams:
            structured: Any = {"chunks": value}
        elif self.wraps_result:
            structured = {"result": value}
        else:
            structured = value if isinstance(value, dict) else None
        text = json.dumps(structured if self.schema.streams else value, ensure_ascii=False)
        return types.CallToolResult(
            content=[types.TextContent(text=text)], structured_content=structured
        )


def tool_error(exc: MeshError) -> types.CallToolResult:
    """A mesh error as a tool error: ``ErrorType: message``, the rule named for a denial."""
    text = f"{type(exc).__name__}: {exc.message}"
    if exc.rule is not None and exc.rule not in exc.message:
        text += f" (rule {exc.rule!r})"
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def _failure(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


class _ProgressRelay:
    """Sends a call's progress to the MCP client in order, from a task of the handler's own
    (the mesh's ``on_progress`` callback is synchronous), without ever holding up the call.

    ``counting`` (streams): ``progress`` counts the notifications and has no total, since
    chunks and reports are mixed; otherwise ``progress`` is the mesh fraction of 1, and a
    report that does not advance it is dropped (MCP requires progress to increase).
    """

    def __init__(self, session: ServerSession, counting: bool) -> None:
        self._session = session
        self._counting = counting
        self._last = -1.0
        self._sent = 0
        self._queue: asyncio.Queue[tuple[float, float | None, str | None] | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._send())

    def report(self, p: Progress) -> None:
        """A mesh progress report."""
        if self._counting:
            note = f"{p.fraction:.0%}" + (f" {p.note}" if p.note else "")
            self._step(note)
        elif p.fraction > self._last:
            self._last = p.fraction
            self._queue.put_nowait((p.fraction, 1.0, p.note or None))

    def chunk(self, value: Any) -> None:
        """A streamed chunk."""
        self._step(json.dumps(value, ensure_ascii=False))

    def _step(self, message: str) -> None:
        self._sent += 1
        self._queue.put_nowait((float(self._sent), None, message))

    async def _send(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                await self._session.report_progress(*item)
            except Exception as exc:  # a client gone away: the result would not reach it either
                log.debug("mcp.progress_failed", error_type=type(exc).__name__)

    async def close(self) -> None:
        """Send what is queued (so every notification precedes the result), then stop."""
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 2.0)
        except TimeoutError:
            self._task.cancel()

    def abandon(self) -> None:
        """Stop at once (the call was cancelled: nobody waits for its progress)."""
        self._task.cancel()


@dataclass
class McpBridge:
    """An MCP server whose tools are chosen mesh endpoints, calling them through ``mesh``.

    Args:
        mesh: a started mesh connection: the bridge's own identity, which makes every call.
        selection: the endpoints to serve (``parse_selection``).
        principal: an external principal (``user:alice``) every call is made on behalf of
            (``Delegate(origin=...)``: the bridge's certificate needs the role ``gateway``).
        principal_of: for a bridge mounted in an HTTP server that authenticates its clients:
            the principal of one MCP request, from the transport's request object (the
            Starlette ``Request``; ``None`` on stdio); it wins over ``principal`` when it
            returns one.
        timeout: seconds each mesh call may take (``None``: the policy's, else the mesh's
            default request timeout).
        name / version: what the server says it is in ``initialize``.
        schema_timeout: seconds ``tools/list`` waits for one agent's schemas.

    Use ``server`` with any MCP transport: ``run`` for a stream pair (stdio),
    ``mcp_asgi_app`` for streamable HTTP.
    """

    mesh: Mesh
    selection: ToolSelection
    principal: str | None = None
    principal_of: Callable[[Any], str | None] | None = None
    timeout: float | None = None
    name: str = "natsmesh"
    version: str = ""
    schema_timeout: float = SCHEMA_TIMEOUT
    _targets: dict[str, ToolTarget] = field(default_factory=dict, init=False, repr=False)
    server: Server[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.principal is not None:
            Delegate(origin=self.principal)  # checks its form: kind:name
        self.server = Server(
            self.name,
            version=self.version,
            instructions="Tools served from a natsmesh service mesh: each tool is one endpoint "
            "of a mesh agent, called with the mesh's identity, policy, deadlines and audit.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    # --- the catalogue -----------------------------------------------------------------------

    async def refresh(self) -> list[ToolTarget]:
        """Look the chosen endpoints up again (verified schemas from a live instance of each
        agent) and return them; an agent that does not answer within ``schema_timeout``
        keeps the tools last seen for it (none, the first time), logged as a warning."""
        found: dict[str, ToolTarget] = {}
        for agent in self.selection.agents_to_ask():
            try:
                schemas = await self.mesh.schemas(agent, timeout=self.schema_timeout)
            except MeshError as exc:
                log.warning("mcp.agent_unavailable", agent=agent, error=str(exc))
                found.update({k: t for k, t in self._targets.items() if t.agent == agent})
                continue
            wanted = (
                sorted(schemas)
                if agent in self.selection.agents
                else [e for a, e in self.selection.tools if a == agent]
            )
            for endpoint in wanted:
                if endpoint not in schemas:
                    log.warning("mcp.no_such_endpoint", agent=agent, endpoint=endpoint)
                    continue
                target = ToolTarget(agent, endpoint, schemas[endpoint])
                found[target.name] = target
        self._targets = found
        return list(found.values())

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[t.tool() for t in await self.refresh()])

    # --- a call ------------------------------------------------------------------------------

    def _delegate(self, ctx: ServerRequestContext[Any, Any]) -> Delegate | None:
        principal = self.principal
        if self.principal_of is not None:
            principal = self.principal_of(ctx.request) or principal
        return Delegate(origin=principal) if principal else None

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        target = self._targets.get(params.name)
        if target is None:
            await self.refresh()
            target = self._targets.get(params.name)
        if target is None:
            return _failure(f"NotFound: no tool {params.name!r} (tools/list names those served)")
        token = ctx.meta.get("progress_token") if ctx.meta else None
        relay = _ProgressRelay(ctx.session, target.schema.streams) if token is not None else None
        try:
            value = await self._mesh_call(target, params.arguments or {}, relay, ctx)
        except MeshError as exc:
            if relay is not None:
                await relay.close()
            return tool_error(exc)
        except asyncio.CancelledError:
            if relay is not None:
                relay.abandon()
            raise
        except Exception as exc:  # a bug here: logged, never sent as a traceback
            if relay is not None:
                relay.abandon()
            log.error("mcp.call_failed", tool=target.name, exc_info=exc)
            return _failure(f"Internal: the MCP bridge failed calling {target.name} (see its log)")
        if relay is not None:
            await relay.close()
        return target.result(value)

    async def _mesh_call(
        self,
        target: ToolTarget,
        arguments: dict[str, Any],
        relay: _ProgressRelay | None,
        ctx: ServerRequestContext[Any, Any],
    ) -> Any:
        delegate = self._delegate(ctx)
        on_progress = relay.report if relay is not None else None
        if not target.schema.streams:
            reply = await self.mesh.request(
                target.agent,
                target.endpoint,
                JsonBody(arguments),
                JsonBody,
                timeout=self.timeout,
                on_progress=on_progress,
                delegate=delegate,
            )
            return reply.root
        chunks: list[Any] = []
        stream = self.mesh.stream(
            target.agent,
            target.endpoint,
            JsonBody(arguments),
            JsonBody,
            timeout=self.timeout,
            on_progress=on_progress,
            delegate=delegate,
        )
        async with stream:
            async for chunk in stream:
                chunks.append(chunk.root)
                if relay is not None:
                    relay.chunk(chunk.root)
        return chunks

    # --- transports --------------------------------------------------------------------------

    async def run(
        self,
        read: ReadStream[SessionMessage | Exception],
        write: WriteStream[SessionMessage],
    ) -> None:
        """Serve one MCP connection over a stream pair (``mcp.server.stdio.stdio_server``)
        until its read side closes."""
        await self.server.run(read, write, self.server.create_initialization_options())


def mcp_asgi_app(
    bridge: McpBridge, *, path: str = "/mcp", host: str = "127.0.0.1", stateless: bool = False
) -> Starlette:
    """The bridge as a streamable HTTP ASGI app (the SDK's), serving MCP at ``path``.

    Its lifespan runs the SDK's session manager: a server that mounts it (the HTTP gateway at
    ``/mcp``) must enter ``app.router.lifespan_context(app)`` in its own lifespan, since
    Starlette does not run a mounted app's. For ``host`` 127.0.0.1, localhost or ::1 the SDK
    turns on its DNS-rebinding protection (only local ``Host`` and ``Origin`` headers).

    Args:
        bridge: what it serves.
        path: the MCP endpoint's path.
        host: the address it is served on (for the rebinding protection).
        stateless: no MCP sessions (each request stands alone; no server-sent progress
            beyond the request's own stream).
    """
    return bridge.server.streamable_http_app(
        streamable_http_path=path, host=host, stateless_http=stateless
    )
