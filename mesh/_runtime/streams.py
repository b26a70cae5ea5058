"""Streamed replies at the caller: the chunks of one call as they arrive, with credit.

``Mesh.stream`` returns a ``Stream``; iterating it sends the request (through the client
pipeline, like any call: policy, deadline, retries before the first frame, pick) and yields
each chunk as its model. The inbox (``mesh._runtime.replies``) checks every frame (sealed,
addressed to this call, in sequence) and hands it to the call's ``StreamState``, which holds
at most the credit granted and grants more as the consumer takes chunks
(``docs/protocol.md`` section 21).

Leaving the stream early (``break``, an exception, ``aclose``, the task being cancelled) sends
a sealed cancel to the callee, whose handler is cancelled, and every call it made in turn.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from mesh.errors import InvalidArgument, MeshError

__all__ = [
    "DEFAULT_CREDIT",
    "Progress",
    "Stream",
    "StreamState",
    "json_chunk",
    "model_chunk",
    "parse_progress",
]

M = TypeVar("M", bound=BaseModel)
C = TypeVar("C")
DEFAULT_CREDIT = 16
"""Chunks a caller accepts ahead of what it has consumed, unless it says otherwise."""


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report of a call in progress (``ctx.progress`` at the callee).

    Attributes:
        fraction: how far the call has come, ``0.0`` to ``1.0``.
        note: what the handler is doing, as it said (at most 256 characters).
    """

    fraction: float
    note: str = ""


def parse_progress(body: bytes) -> Progress | None:
    """The report in a PROGRESS frame's body, or ``None`` when it is malformed (dropped: it
    came sealed from the callee, but says nothing usable)."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    fraction, note = raw.get("fraction"), raw.get("note", "")
    if (
        not isinstance(fraction, int | float)
        or isinstance(fraction, bool)
        or not 0.0 <= fraction <= 1.0
        or not isinstance(note, str)
    ):
        return None
    return Progress(float(fraction), note[:256])


def model_chunk(chunk_type: type[M], what: str) -> Callable[[bytes], M]:
    """Parse a chunk into ``chunk_type``.

    Raises (from the parser):
        InvalidArgument: the chunk does not match the model.
    """

    def parse(raw: bytes) -> M:
        try:
            return chunk_type.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidArgument(
                f"chunk of {what} does not match {chunk_type.__name__}: "
                f"{exc.error_count()} validation error(s)"
            ) from None

    return parse


def json_chunk(what: str) -> Callable[[bytes], Any]:
    """Parse a chunk as JSON (``Mesh.stream_json``)."""

    def parse(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            raise InvalidArgument(f"chunk of {what} is not JSON") from None

    return parse


class StreamState:
    """The chunks of one streamed call between the inbox and the consumer.

    The inbox calls ``chunk``, ``end``, ``fail`` and ``progressed``; the consumer ``next``.
    At most ``granted - consumed`` chunks (the window) are ever held: a callee that sends more
    breaks the stream (the inbox checks ``received`` against ``granted``).

    Args:
        window: chunks granted ahead of those consumed (1 to ``MAX_CREDIT``).
        on_progress: called with each progress report, if given.
    """

    def __init__(self, window: int, on_progress: Callable[[Progress], None] | None = None) -> None:
        self.window = window
        self.granted = window
        self.received = 0
        self.consumed = 0
        self.opened = False  # the first frame arrived: no more retries
        self.ended = False  # no more chunks will be taken (the end arrived, or a failure)
        self.answered = False  # the callee's authenticated last frame arrived: it has stopped
        self.error: MeshError | None = None
        self.progress: Progress | None = None
        self.on_progress = on_progress
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.grant: Callable[[int], None] | None = None
        """Sends the callee a credit frame with the new total; set once the stream opened."""
        self.cancel: Callable[[], None] | None = None
        """Sends the callee a cancel; set once the stream opened."""
        self.release: Callable[[], None] | None = None
        """Forgets the call at the inbox; set once the stream opened."""
        self.finished: Callable[[str], None] | None = None
        """Called once with the stream's code when the consumer is done (``OK``, the error's
        code, or ``CANCELLED`` when it left before the end): the caller's span and signals."""

    # --- the inbox ---------------------------------------------------------------------------

    def chunk(self, raw: bytes) -> None:
        self.received += 1
        self._chunks.append(raw)
        self._wake()

    def end(self) -> None:
        self.ended = self.answered = True
        self._wake()

    def fail(self, exc: MeshError, *, answered: bool = False) -> None:
        """The stream failed: ``answered`` when the callee's last frame said so (it has
        stopped), else here (a broken sequence, the deadline), and the callee is cancelled
        when the consumer closes."""
        if self.ended:
            return
        self.ended = True
        self.answered = answered
        self.error = exc
        self._wake()

    def progressed(self, progress: Progress) -> None:
        self.progress = progress
        if self.on_progress is not None:
            self.on_progress(progress)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the consumer ------------------------------------------------------------------------

    async def next(self) -> bytes | None:
        """The next chunk, or ``None`` after the callee's end.

        Raises:
            MeshError: the stream failed (the callee's error, a broken sequence, the deadline);
                chunks that arrived before the failure are delivered first.
        """
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        raw = self._chunks.popleft()
        self.consumed += 1
        if (
            not self.ended
            and self.grant is not None
            and self.granted - self.consumed <= self.window // 2
        ):
            self.granted = self.consumed + self.window
            self.grant(self.granted)
        return raw

    def close(self) -> None:
        """The consumer is done: cancel the callee unless its last frame arrived, forget the
        call."""
        code = "OK" if self.error is None else self.error.code
        if not self.ended or self._chunks:
            code = "CANCELLED"
        self.ended = True
        if not self.answered:
            self.answered = True
            if self.cancel is not None:
                self.cancel()
        if self.release is not None:
            release, self.release = self.release, None
            release()
        if self.finished is not None:
            finished, self.finished = self.finished, None
            finished(code)


class Stream(Generic[C]):
    """A streamed reply: ``async for chunk in mesh.stream(...)``.

    Nothing is sent until the iteration starts. ``async with`` closes it deterministically;
    leaving early in any way cancels the call at the callee.

    Attributes:
        progress: the last progress report received, if any.
    """

    def __init__(
        self,
        open: Callable[[StreamState], Awaitable[bytes]],
        parse: Callable[[bytes], C],
        window: int,
        on_progress: Callable[[Progress], None] | None,
        what: str,
    ) -> None:
        self._open = open
        self._parse = parse
        self._state = StreamState(window, on_progress)
        self._what = what
        self._started = False
        self._iter: AsyncIterator[C] | None = None

    @property
    def progress(self) -> Progress | None:
        return self._state.progress

    def __aiter__(self) -> AsyncIterator[C]:
        if self._started:
            raise InvalidArgument(f"the stream of {self._what} is already being read")
        self._started = True
        # The generator must not refer back to this object: leaving an ``async for`` early
        # then frees both at once, and the generator's ``finally`` (the cancel) runs at the
        # next loop iteration instead of whenever the garbage collector finds a cycle.
        self._iter = _chunks(self._open, self._state, self._parse)
        return self._iter

    async def aclose(self) -> None:
        """Stop reading: the callee's handler is cancelled if it has not finished."""
        it = self._iter
        if it is not None:
            await it.aclose()  # type: ignore[attr-defined]
        else:
            self._started = True
            self._state.close()

    async def __aenter__(self) -> Stream[C]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _chunks(
    open: Callable[[StreamState], Awaitable[bytes]],
    state: StreamState,
    parse: Callable[[bytes], C],
) -> AsyncIterator[C]:
    """The chunks of a stream as they arrive; closing it (or leaving it) closes the stream."""
    try:
        await open(state)
        while True:
            raw = await state.next()
            if raw is None:
                return
            yield parse(raw)
    finally:
        state.close()
