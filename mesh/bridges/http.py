"""The HTTP/JSON gateway (``mesh-agent gateway``): an ASGI app (Starlette) and its server
(uvicorn), in front of one mesh connection whose certificate holds the role ``gateway``.

=================================  ==========================================================
``POST /v1/{agent}/{endpoint}``    a JSON body in, the reply as JSON out; an endpoint that
                                   streams answers with server-sent events (``data:`` one
                                   chunk each, ``event: error`` with a problem, ``event: end``)
``GET /openapi.json``              OpenAPI 3.1 from the agents' published schemas
``GET /healthz``                   whether keys are accepted (a fresh signed head)
=================================  ==========================================================

Every call is checked in this order, cheapest refusal first, and answered with an RFC 9457
problem when refused (``mesh.bridges.problems``): the API key (401; 503 while the gateway
cannot know of recent revocations), the agent and endpoint names and whether this gateway
exposes them (404), the size (``Content-Length`` then the bytes
read: 413), the JSON (400: malformed JSON is never sent), the ``X-Mesh-Timeout`` header (400).
Then the gateway makes the mesh call **on the key's principal's behalf**: a delegation chain
whose origin is the principal and whose scopes are the key's roles
(``Delegate(origin=..., scopes=...)``), with the trace context of ``traceparent`` and
``tracestate`` and a deadline of at most ``max_timeout``. A client that disconnects cancels
the call, which cancels the handler at the callee (and what it called).

One access-log line per call (JSON on stdout): method, path, status, duration, principal,
key id, mesh code, trace id, sizes; never a body.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mesh import (
    DeadlineExceeded,
    Delegate,
    EndpointSchema,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Mesh,
    MeshError,
    MessageTooLarge,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from mesh._core.envelope import check_trace_context
from mesh._core.gateway_keys import key_id_of
from mesh._core.names import validate_name
from mesh._log import get_logger
from mesh.bridges.apikeys import KeyRing, Principal, presented_key
from mesh.bridges.openapi import TIMEOUT_HEADER, openapi_document
from mesh.bridges.problems import PROBLEM_JSON, Problem, problem_for
from mesh.bridges.serving import serving

__all__ = ["Gateway", "GatewaySettings", "serve_gateway"]

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_TIMEOUT = 60.0
REGISTRY = "registry"  # never exposed: it answers admins only, and has its own tool
GATEWAY_ROLE = "gateway"  # the certificate role that may name an origin (docs/delegation.md)
WEB_MISSING = "the gateway needs starlette and uvicorn: pip install 'natsmesh[web]'"
OPENAPI_TTL_S = 5.0
SCHEMAS_TIMEOUT_S = 3.0
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_END = object()


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How a gateway answers.

    Attributes:
        agents: the agents it exposes (``None``: every agent the directory lists, but the
            registry).
        max_body: the largest request body in bytes (413 beyond).
        max_timeout: the longest a call may take, seconds: ``X-Mesh-Timeout`` is cut to it,
            and a call without the header gets the policy's timeout within it.
        access_log: write one JSON line per call on stdout.
        allow_stale_keys: accept keys while the signed head is expired.
    """

    agents: tuple[str, ...] | None = None
    max_body: int = DEFAULT_MAX_BODY
    max_timeout: float = DEFAULT_MAX_TIMEOUT
    access_log: bool = True
    allow_stale_keys: bool = False


@dataclass
class Access:
    """What the access-log line of one call says (never a body)."""

    method: str
    path: str
    status: int = 0
    principal: str | None = None
    key: str | None = None
    agent: str | None = None
    endpoint: str | None = None
    code: str | None = None
    rule: str | None = None
    trace_id: str | None = None
    request_bytes: int = 0
    reply_bytes: int = 0
    chunks: int | None = None
    started: float = field(default_factory=time.perf_counter)


class _ClientGone(Exception):
    """The HTTP client disconnected."""


class _Refused(Exception):
    """A call the gateway answers itself, with this problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.body.get("detail"))
        self.problem = problem


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (after the body was read, uvicorn's ``receive``
    blocks until then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then cancel it (a cancelled mesh
    call cancels the handler at the callee). ``work`` runs in this task; a watcher task
    cancels it when the client goes (one task per call, not two).

    Raises:
        _ClientGone: the client disconnected (``work`` was cancelled).
    """
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        me.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # this request's own task was cancelled (the server stops)
        me.uncancel()
        raise _ClientGone from None
    finally:
        watcher.cancel()


def _problem_response(problem: Problem) -> Response:
    return Response(
        problem.encoded(), problem.status, headers=problem.headers, media_type=PROBLEM_JSON
    )


def _sse(event: str | None, data: bytes) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data + b"\n\n"


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class EventStream:
    """The server-sent events of one streamed call: started once the first chunk (or the
    end) arrived, so a refusal before it is an ordinary problem response; cancelled when the
    client disconnects."""

    def __init__(
        self,
        stream: Any,
        chunks: AsyncIterator[Any],
        first: Any,
        access: Access,
        instance: str,
    ) -> None:
        self._stream = stream
        self._chunks = chunks
        self._first = first
        self._access = access
        self._instance = instance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        access = self._access
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        access.status, access.code, access.chunks = 200, "OK", 0

        async def event(data: bytes) -> None:
            access.reply_bytes += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def pump() -> None:
            try:
                if self._first is not _END:
                    await event(_sse(None, _json(self._first)))
                    access.chunks = 1
                    async for chunk in self._chunks:
                        await event(_sse(None, _json(chunk)))
                        access.chunks = (access.chunks or 0) + 1
            except MeshError as exc:
                problem = problem_for(exc, instance=self._instance)
                access.code, access.rule = problem.code, exc.rule
                await event(_sse("error", problem.encoded()))
            await event(_sse("end", _json({"chunks": access.chunks, "code": access.code})))

        try:
            await _unless_disconnected(receive, pump())
        except (_ClientGone, OSError):  # OSError: uvicorn's send once the client has gone
            access.code = "CANCELLED"
            return
        finally:
            await self._stream.aclose()  # the callee's handler is cancelled if still running
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class Gateway:
    """An HTTP edge for one mesh connection.

    Args:
        mesh: a started mesh connection whose certificate holds the role ``gateway``.
        settings: what it exposes and its bounds.
        keys: the key ring (default: one on ``mesh``, started by ``start``).
    """

    def __init__(
        self, mesh: Mesh, settings: GatewaySettings | None = None, *, keys: KeyRing | None = None
    ) -> None:
        self.mesh = mesh
        self.settings = settings or GatewaySettings()
        self.keys = keys or KeyRing(mesh, allow_stale=self.settings.allow_stale_keys)
        self._own_keys = keys is None
        self._openapi: tuple[float, dict[str, Any]] | None = None
        self._openapi_lock = asyncio.Lock()
        self._access_logger: Any = None

    async def start(self, timeout: float = 10.0) -> None:
        """Read the keys and open the directory watches of the exposed agents.

        Raises:
            FailedPrecondition: the mesh's certificate lacks the role ``gateway``.
            Unavailable: the keys or the directory could not be read within ``timeout``.
        """
        cert = self.mesh.identity.certificate
        if GATEWAY_ROLE not in cert.roles:
            raise FailedPrecondition(
                f"{cert.agent}'s certificate lacks the role {GATEWAY_ROLE!r} that calls on a "
                f"principal's behalf need: issue it with --roles {GATEWAY_ROLE} (mesh-policy "
                f"identity issue {cert.agent} --roles {GATEWAY_ROLE} ..., or a join token from "
                f"mesh-policy identity token {cert.agent} --roles {GATEWAY_ROLE})"
            )
        if self._own_keys:
            await self.keys.start(timeout)
        directory = self.mesh.directory
        if self.settings.agents is None:
            await directory.watch_all(timeout)
        else:
            for agent in self.settings.agents:
                await directory.watch_agent(agent, timeout)

    async def close(self) -> None:
        if self._own_keys:
            await self.keys.close()

    # --- the app ---------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The ASGI application."""

        async def not_routed(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            status = exc.status_code
            text = "no such route: the gateway serves POST /v1/{agent}/{endpoint}"
            if status == 405:
                text = f"{request.method} is not allowed here"
            problem = Problem(
                status,
                {
                    "type": "urn:natsmesh:problem:" + ("not-routed" if status == 404 else "method"),
                    "title": "Not found" if status == 404 else "Method not allowed",
                    "status": status,
                    "detail": text,
                    "code": "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT",
                    "instance": request.url.path,
                },
                dict(exc.headers or {}),
            )
            return _problem_response(problem)

        return Starlette(
            routes=[
                Route("/v1/{agent}/{endpoint}", _CallRoute(self), methods=["POST"]),
                Route("/openapi.json", self._openapi_route, methods=["GET"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: not_routed},
        )

    async def _openapi_route(self, request: Request) -> Response:
        return JSONResponse(await self.openapi(), headers={"Cache-Control": "no-store"})

    async def _health(self, request: Request) -> Response:
        head = self.mesh.head
        try:
            self.keys.check_fresh()
        except Unavailable as exc:
            return JSONResponse({"status": "unavailable", "detail": exc.message}, 503)
        return JSONResponse(
            {"status": "ok", "head": head.version if head else None, "keys": len(self.keys)}
        )

    def exposed(self) -> list[str]:
        """The agents this gateway serves now."""
        if self.settings.agents is not None:
            return [a for a in self.settings.agents if a != REGISTRY]
        return sorted({r.agent for r in self.mesh.directory.all()} - {REGISTRY})

    async def openapi(self) -> dict[str, Any]:
        """The OpenAPI document of the exposed agents (kept for a few seconds)."""
        async with self._openapi_lock:
            now = time.monotonic()
            if self._openapi is not None and now - self._openapi[0] < OPENAPI_TTL_S:
                return self._openapi[1]
            agents = self.exposed()

            async def schemas(agent: str) -> dict[str, EndpointSchema] | MeshError:
                try:
                    return await self.mesh.schemas(agent, timeout=SCHEMAS_TIMEOUT_S)
                except MeshError as exc:
                    return exc

            found = await asyncio.gather(*(schemas(a) for a in agents))
            ok = {a: s for a, s in zip(agents, found, strict=True) if not isinstance(s, MeshError)}
            missing = {
                a: f"{s.code}: {s.message}"
                for a, s in zip(agents, found, strict=True)
                if isinstance(s, MeshError)
            }
            doc = openapi_document(ok, missing=missing, max_timeout=self.settings.max_timeout)
            self._openapi = (now, doc)
            return doc

    # --- one call --------------------------------------------------------------------------

    def _refuse(self, exc: MeshError, path: str, **how: Any) -> _Refused:
        return _Refused(problem_for(exc, instance=path, **how))

    def _authenticate(self, headers: Headers, access: Access) -> Principal:
        path = access.path
        presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        access.key = key_id_of(presented) if presented else None  # the id only: public
        try:
            return self.keys.authenticate(presented)
        except Unauthenticated as exc:
            raise self._refuse(
                exc, path, status=401, kind="invalid-key", title="Invalid API key"
            ) from None
        except Unavailable as exc:
            raise self._refuse(exc, path, status=503, kind="keys-unavailable") from None

    def _streams(self, agent: str, endpoint: str, path: str) -> bool:
        """Whether ``agent.endpoint`` streams, from the directory (the call decides when no
        instance is listed).

        Raises:
            _Refused: a name that cannot exist, an agent not exposed, an unknown endpoint.
        """
        for kind, name in (("agent", agent), ("endpoint", endpoint)):
            try:
                validate_name(kind, name)
            except InvalidArgument as exc:
                raise self._refuse(NotFound(exc.message), path, kind=f"unknown-{kind}") from None
        listed = self.settings.agents
        if agent == REGISTRY or (listed is not None and agent not in listed):
            raise self._refuse(
                NotFound(f"this gateway does not expose the agent {agent!r}"),
                path,
                kind="unknown-agent",
            )
        # Only now: ``instances`` opens a directory watch for an agent not watched yet, which
        # a client must not make the gateway do for names of its choosing (with all agents
        # exposed, every agent is watched already).
        instances = self.mesh.directory.instances(agent)
        if listed is None and not instances:
            raise self._refuse(
                NotFound(f"no agent {agent!r} in the mesh's directory"), path, kind="unknown-agent"
            )
        if instances and not any(endpoint in r.endpoints for r in instances):
            raise self._refuse(
                NotFound(f"agent {agent!r} has no endpoint {endpoint!r}"),
                path,
                kind="unknown-endpoint",
            )
        return any((e := r.endpoints.get(endpoint)) is not None and e.streams for r in instances)

    async def _body(self, receive: Receive, headers: Headers, path: str) -> bytes:
        limit = self.settings.max_body
        too_large = MessageTooLarge(f"the body is larger than this gateway takes ({limit} bytes)")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._refuse(too_large, path, status=413, kind="too-large", title="Too large")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.max_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    part = message.get("body", b"")
                    size += len(part)
                    if size > limit:
                        raise self._refuse(
                            too_large, path, status=413, kind="too-large", title="Too large"
                        )
                    chunks.append(part)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            slow = DeadlineExceeded(
                f"the body did not arrive within {self.settings.max_timeout:g} s"
            )
            raise self._refuse(slow, path, status=408, kind="slow-body", title="Timeout") from None
        return b"".join(chunks)

    def _timeout(self, headers: Headers, path: str) -> float | None:
        text = headers.get(TIMEOUT_HEADER)
        if text is None:
            return None
        text = text.strip()
        if not _SECONDS.fullmatch(text) or float(text) <= 0:
            raise self._refuse(
                InvalidArgument(f"{TIMEOUT_HEADER} takes seconds, e.g. 2.5, not {text!r}"),
                path,
                kind="bad-timeout",
            )
        return min(float(text), self.settings.max_timeout)

    @staticmethod
    def _trace(headers: Headers, access: Access) -> tuple[str | None, str | None]:
        """The incoming trace context; a malformed one is dropped (W3C: start a new trace)."""
        traceparent, tracestate = headers.get("traceparent"), headers.get("tracestate")
        if traceparent is None:
            return None, None
        try:
            check_trace_context(traceparent, tracestate)
        except InvalidArgument:
            try:
                check_trace_context(traceparent, None)
            except InvalidArgument:
                return None, None
            tracestate = None
        access.trace_id = traceparent.split("-")[1]
        return traceparent, tracestate

    async def call(self, scope: Scope, receive: Receive, access: Access) -> Any:
        """Answer one ``POST /v1/{agent}/{endpoint}``: an ASGI response to send.

        Raises:
            _Refused: answered by the gateway itself (the problem to send).
            _ClientGone: the client disconnected.
            MeshError: the mesh call failed.
        """
        path = access.path
        headers = Headers(scope=scope)
        params = scope["path_params"]
        agent, endpoint = str(params["agent"]), str(params["endpoint"])
        access.agent, access.endpoint = agent, endpoint
        principal = self._authenticate(headers, access)
        access.principal, access.key = principal.name, principal.key_id
        streams = self._streams(agent, endpoint, path)
        # The body is JSON whatever Content-Type says (curl -d sends a form type): a key in
        # a header is what a browser's cross-site form cannot send, not the type.
        body = await self._body(receive, headers, path)
        access.request_bytes = len(body)
        try:
            json.loads(body)
        except ValueError as exc:
            raise self._refuse(
                InvalidArgument(f"the body is not valid JSON: {exc}"), path, kind="malformed-json"
            ) from None
        timeout = self._timeout(headers, path)
        traceparent, tracestate = self._trace(headers, access)
        delegate = Delegate(origin=principal.name, scopes=principal.roles)
        deadline = time.time() + self.settings.max_timeout
        if streams:
            stream = self.mesh.stream_json(
                agent, endpoint, body, timeout=timeout, deadline=deadline,
                traceparent=traceparent, tracestate=tracestate, delegate=delegate,
            )  # fmt: skip
            chunks = stream.__aiter__()

            async def first() -> Any:
                try:
                    return await chunks.__anext__()
                except StopAsyncIteration:
                    return _END

            try:
                head = await _unless_disconnected(receive, first())
            except BaseException:
                await stream.aclose()
                raise
            return EventStream(stream, chunks, head, access, path)
        reply = await _unless_disconnected(
            receive,
            self.mesh.request_json(
                agent, endpoint, body, timeout=timeout, deadline=deadline,
                idempotency_key=headers.get("idempotency-key"), traceparent=traceparent,
                tracestate=tracestate, delegate=delegate,
            ),
        )  # fmt: skip
        data = _json(reply)
        access.status, access.code, access.reply_bytes = 200, "OK", len(data)
        return Response(data, 200, media_type="application/json")

    def log_access(self, access: Access) -> None:
        """The access-log line of one call: JSON on stdout, never a body."""
        if not self.settings.access_log:
            return
        if self._access_logger is None:
            self._access_logger = structlog.wrap_logger(
                structlog.PrintLogger(sys.stdout),
                processors=[
                    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                    structlog.processors.JSONRenderer(),
                ],
                wrapper_class=structlog.BoundLogger,
                context_class=dict,
                cache_logger_on_first_use=False,
            )
        self._access_logger.info(
            "access",
            side="gateway",
            method=access.method,
            path=access.path,
            status=access.status,
            duration_ms=round((time.perf_counter() - access.started) * 1000, 3),
            principal=access.principal,
            key=access.key,
            agent=access.agent,
            endpoint=access.endpoint,
            code=access.code,
            rule=access.rule,
            trace_id=access.trace_id,
            request_bytes=access.request_bytes,
            reply_bytes=access.reply_bytes,
            **({"chunks": access.chunks} if access.chunks is not None else {}),
        )


class _CallRoute:
    """``POST /v1/{agent}/{endpoint}`` as a raw ASGI app: it reads the body itself (bounded)
    and watches for the client's disconnect."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self._gateway
        access = Access(method=scope["method"], path=scope["path"])
        response: Any
        try:
            response = await gateway.call(scope, receive, access)
        except _Refused as refused:
            response = _problem_response(refused.problem)
            access.status, access.code = refused.problem.status, refused.problem.code
        except _ClientGone:
            access.status, access.code = 499, "CANCELLED"
            gateway.log_access(access)
            return  # nobody to answer
        except MeshError as exc:
            problem = problem_for(exc, instance=access.path)
            response = _problem_response(problem)
            access.status, access.code, access.rule = problem.status, problem.code, exc.rule
        except Exception as exc:
            log.error("gateway.call_failed", error_type=type(exc).__name__)
            log.debug("gateway.call_failed", exc_info=True)
            problem = problem_for(Internal("the gateway failed"), instance=access.path)
            response = _problem_response(problem)
            access.status, access.code = problem.status, problem.code
        try:
            await response(scope, receive, send)
        finally:
            gateway.log_access(access)


async def serve_gateway(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    started: Callable[[str], None] | None = None,
) -> None:
    """Serve ``gateway`` on ``host:port`` until cancelled.

    Args:
        gateway: a started gateway.
        host: the address to bind.
        port: the port (``0``: a free one).
        started: called once with the base URL (the real port) when it listens.

    Raises:
        FailedPrecondition: uvicorn is not installed, or the address cannot be bound.
    """
    async with serving(
        gateway.app(), host, port, what="the gateway server", missing=WEB_MISSING
    ) as (url, task):
        if started is not None:
            started(url)
        await asyncio.shield(task)
