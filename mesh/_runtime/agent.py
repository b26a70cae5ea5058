"""Agent definitions: typed endpoints and event handlers, and the ``Context`` a handler gets.

An ``Agent`` is only a declaration; a ``Mesh`` connection serves it (``mesh.serve`` or
``mesh-agent run``).
"""

from __future__ import annotations

import collections.abc
import inspect
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from mesh._core.delegation import Delegate, Delegation
from mesh._core.identity import Certificate
from mesh._core.names import validate_name
from mesh._core.schemas import EndpointSchema, describe_endpoint
from mesh.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from mesh._runtime.ports import MeshHandle
    from mesh._runtime.streams import Progress, Stream

__all__ = ["Agent", "Context", "EndpointSpec", "EventSpec", "Peer"]

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
S = TypeVar("S", bound=Callable[..., Awaitable[Any] | AsyncIterator[Any]])
H = TypeVar("H", bound=Callable[["MeshHandle"], Awaitable[None]])


@dataclass(frozen=True, slots=True)
class Peer:
    """The verified identity of the other side of a call or the sender of an event."""

    agent: str
    instance: str
    roles: tuple[str, ...]
    serial: str
    certificate: Certificate | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class Context:
    """What a handler knows about the request it serves.

    Attributes:
        caller: the verified sender.
        deadline: absolute deadline (unix seconds) of the request; ``None`` for events.
        endpoint: the endpoint (or event topic) being served.
        attempt: attempt number of the request (1 for the first).
        idempotency_key: the caller's key, when given.
        traceparent / tracestate: W3C trace context received.
        metadata: the request metadata the caller set (authenticated with the request, not
            encrypted; routes match on it).
        mirrored: the request is a mirror's copy: its reply is discarded, so a handler may
            skip side effects (``docs/traffic.md``).

    Nested calls (``request``, ``stream``) inherit the deadline and the trace context, and are
    cancelled with the handler: a call tree is cancelled from its root down.
    """

    mesh: MeshHandle
    caller: Peer
    endpoint: str
    deadline: float | None = None
    attempt: int = 1
    idempotency_key: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    mirrored: bool = False
    reporter: Callable[[float, str], Awaitable[None]] | None = field(default=None, repr=False)
    """Sends a progress frame; set by the server when the caller accepts them."""
    delegation: Delegation | None = None
    """The verified delegation chain the request came with: who the work is for
    (``origin``), through which agents (``path``), with which ``scopes`` and budgets.
    ``None``: a direct call, on the caller's own behalf. Nested calls carry it on."""
    spender: Callable[[int], Awaitable[None]] | None = field(default=None, repr=False)
    """Debits the chain's cost budget; set by the server when the chain has one."""
    carries: bool = True
    """Whether nested calls carry ``delegation`` on (not in event handlers: an event's chain
    says who the work was for, but lends a subscriber no authority)."""

    async def spend(self, cost: int) -> None:
        """Spend ``cost`` of the delegation chain's cost budget (LLM tokens, money: units are
        the application's), shared by every branch of the call tree.

        Raises:
            ResourceExhausted: the budget would be exceeded (nothing is spent).
            FailedPrecondition: the request has no cost budget to spend from.
        """
        if type(cost) is not int or cost < 0:
            raise InvalidArgument("a cost is a whole number >= 0")
        if self.spender is None:
            raise FailedPrecondition("this request carries no cost budget (delegate=cost)")
        await self.spender(cost)

    async def progress(self, fraction: float, note: str = "") -> None:
        """Report how far the call has come (``0.0`` to ``1.0``) and what it is doing.

        The caller sees it (``on_progress``, ``Stream.progress``) when it asked for progress,
        and each report keeps its inactivity timeout (``idle_timeout``) from firing; the
        deadline never moves. At most 10 reports a second are sent: reports in between are
        dropped, the last one (``fraction`` 1.0) never. A caller that did not ask gets none.

        Raises:
            InvalidArgument: ``fraction`` outside 0 to 1, or ``note`` over 256 characters.
        """
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgument(f"progress fraction {fraction!r} is not between 0 and 1")
        if len(note) > 256:
            raise InvalidArgument("progress notes are at most 256 characters")
        if self.reporter is not None:
            await self.reporter(float(fraction), note)

    @property
    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.time())

    async def request(
        self,
        agent: str,
        endpoint: str,
        body: BaseModel,
        reply_type: type[M],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        idle_timeout: float | None = None,
        delegate: Delegate | None = None,
    ) -> M:
        """Call another agent; the call inherits this request's deadline and trace context
        (not its metadata: pass ``metadata`` to set the nested call's) and carries its
        delegation chain on, narrowed by ``delegate``."""
        return await self.mesh.request(
            agent,
            endpoint,
            body,
            reply_type,
            timeout=timeout,
            deadline=self.deadline,
            idempotency_key=idempotency_key,
            metadata=metadata,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            on_progress=on_progress,
            idle_timeout=idle_timeout,
            chain=self.delegation if self.carries else None,
            delegate=delegate,
        )

    def stream(
        self,
        agent: str,
        endpoint: str,
        body: BaseModel,
        chunk_type: type[M],
        *,
        timeout: float | None = None,
        credit: int | None = None,
        idle_timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        metadata: Mapping[str, str] | None = None,
        delegate: Delegate | None = None,
    ) -> Stream[M]:
        """Call a streaming endpoint of another agent (``Mesh.stream``); the call inherits
        this request's deadline, trace context and delegation chain."""
        return self.mesh.stream(
            agent,
            endpoint,
            body,
            chunk_type,
            timeout=timeout,
            deadline=self.deadline,
            credit=credit,
            idle_timeout=idle_timeout,
            on_progress=on_progress,
            metadata=metadata,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            chain=self.delegation if self.carries else None,
            delegate=delegate,
        )

    async def publish(self, topic: str, event: BaseModel) -> None:
        """Publish a signed event as this agent, continuing the trace and, when the request
        had one, its delegation chain (subscribers see who the work was for)."""
        await self.mesh.publish(
            topic,
            event,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
            chain=self.delegation if self.carries else None,
        )


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """A declared endpoint."""

    name: str
    handler: Callable[..., Any]
    """An async function, or an async generator function when ``streams``."""
    input_type: type[BaseModel]
    output_type: type[BaseModel] | None
    idempotent: bool
    concurrency: int | None
    wants_context: bool
    streams: bool = False
    """The handler is an async generator: it answers with a stream of ``output_type``."""


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A declared event handler for ``topic`` published by ``agent`` (``"*"`` for any agent)."""

    agent: str
    topic: str
    handler: Callable[..., Awaitable[Any]]
    event_type: type[BaseModel]
    wants_context: bool


def _model_param(
    fn: Callable[..., Any], what: str, streams: bool = False
) -> tuple[type[BaseModel], Any, bool]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # NameError and friends from unresolvable annotations
        raise InvalidArgument(
            f"{what} {fn.__qualname__}: cannot resolve its type annotations ({exc})"
        ) from None
    params = list(inspect.signature(fn).parameters.values())
    if not params or len(params) > 2:
        raise InvalidArgument(f"{what} {fn.__qualname__} must take (body, ctx) or (body)")
    model = hints.get(params[0].name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise InvalidArgument(
            f"{what} {fn.__qualname__}: first parameter must be annotated with a pydantic model"
        )
    if not inspect.iscoroutinefunction(fn) and not (streams and inspect.isasyncgenfunction(fn)):
        raise InvalidArgument(f"{what} {fn.__qualname__} must be an async function")
    return model, hints.get("return"), len(params) == 2


def _chunk_type(fn: Callable[..., Any], out: Any) -> Any:
    """The chunk model of a streaming endpoint: ``X`` of its ``AsyncIterator[X]`` (or
    ``AsyncGenerator[X, None]``, ``AsyncIterable[X]``) return annotation."""
    origin = typing.get_origin(out)
    if origin in (
        collections.abc.AsyncIterator,
        collections.abc.AsyncGenerator,
        collections.abc.AsyncIterable,
    ):
        args = typing.get_args(out)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0]
    raise InvalidArgument(
        f"streaming endpoint {fn.__qualname__} must be annotated to return "
        "AsyncIterator[Model] of a pydantic model"
    )


@dataclass
class Agent:
    """Declares an agent: its name, version, labels, endpoints and event handlers.

    Example::

        researcher = Agent("researcher", version="1.2.0")

        @researcher.endpoint(idempotent=True, concurrency=8)
        async def answer(q: Question, ctx: Context) -> Answer: ...
    """

    name: str
    version: str = "0.0.0"
    labels: dict[str, str] = field(default_factory=dict)
    description: str = ""
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)
    startup: list[Callable[[MeshHandle], Awaitable[None]]] = field(default_factory=list)
    shutdown: list[Callable[[MeshHandle], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_name("agent", self.name)

    @overload
    def endpoint(self, fn: S) -> S: ...

    @overload
    def endpoint(
        self,
        *,
        name: str | None = None,
        idempotent: bool = False,
        concurrency: int | None = None,
    ) -> Callable[[S], S]: ...

    def endpoint(
        self,
        fn: Callable[..., Awaitable[Any] | AsyncIterator[Any]] | None = None,
        *,
        name: str | None = None,
        idempotent: bool = False,
        concurrency: int | None = None,
    ) -> Any:
        """Register an async handler ``(body: Model, ctx: Context) -> Model`` as an endpoint.

        An async generator ``(body, ctx) -> AsyncIterator[Chunk]`` is a streaming endpoint:
        each ``yield`` sends one sealed chunk, as fast as the caller grants credit
        (``Mesh.stream``, ``docs/streaming.md``).

        Args:
            name: endpoint name (default: the function name).
            idempotent: safe to run twice; allows automatic retries.
            concurrency: handlers of this endpoint run at once (default from ``Limits``).
        """

        def register(f: S) -> S:
            ep_name = validate_name("endpoint", name or f.__name__.replace("_", "-"))
            model, out, wants_ctx = _model_param(f, "endpoint", streams=True)
            streams = inspect.isasyncgenfunction(f)
            if streams:
                out = _chunk_type(f, out)
            if (
                out is not None
                and out is not type(None)
                and not (isinstance(out, type) and issubclass(out, BaseModel))
            ):
                raise InvalidArgument(
                    f"endpoint {f.__qualname__} must return a pydantic model or None"
                )
            if ep_name in self.endpoints:
                raise InvalidArgument(f"agent {self.name!r} already has endpoint {ep_name!r}")
            self.endpoints[ep_name] = EndpointSpec(
                name=ep_name,
                handler=f,
                input_type=model,
                output_type=out if isinstance(out, type) and issubclass(out, BaseModel) else None,
                idempotent=idempotent,
                concurrency=concurrency,
                wants_context=wants_ctx,
                streams=streams,
            )
            return f

        return register(fn) if fn is not None else register

    def schemas(self) -> dict[str, EndpointSchema]:
        """Each endpoint's published schemas, by endpoint name: the JSON Schemas of its input
        and output (of each chunk, for a streaming endpoint) from its pydantic models, and
        their hash, which this agent's directory records carry (``docs/protocol.md``
        section 19). Computed from the declaration: nothing is sent."""
        return {
            name: describe_endpoint(
                name,
                spec.input_type,
                spec.output_type,
                streams=spec.streams,
                idempotent=spec.idempotent,
            )
            for name, spec in self.endpoints.items()
        }

    def on_start(self, fn: H) -> H:
        """Register ``async fn(mesh)`` to run once the agent is ready, before it is announced."""
        self.startup.append(fn)
        return fn

    def on_stop(self, fn: H) -> H:
        """Register ``async fn(mesh)`` to run when the agent drains, after in-flight work."""
        self.shutdown.append(fn)
        return fn

    def on_event(self, agent: str, topic: str) -> Callable[[F], F]:
        """Register an async handler ``(event: Model, ctx: Context) -> None`` for ``topic``
        events published by ``agent`` (``"*"``: any agent)."""
        if agent != "*":
            validate_name("agent", agent)
        validate_name("topic", topic)

        def register(f: F) -> F:
            model, _out, wants_ctx = _model_param(f, "event handler")
            self.events.append(EventSpec(agent, topic, f, model, wants_ctx))
            return f

        return register
