"""The caller's stream buffer (``StreamState``): credit, order of errors, the codes a stream ends
with; progress bodies; and the wire bits of streaming (records, control headers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import msgpack
import pytest
from pydantic import BaseModel

from mesh import Agent, Context
from mesh._core.envelope import (
    MAX_CREDIT,
    PREFIX_LEN,
    Kind,
    control_header,
    decode_frame,
    reply_header,
    request_header,
)
from mesh._runtime.streams import Progress, StreamState, json_chunk, parse_progress
from mesh.errors import InvalidArgument, PermissionDenied


def opened(window: int) -> tuple[StreamState, list[int], list[str], list[str]]:
    state = StreamState(window)
    grants: list[int] = []
    events: list[str] = []
    codes: list[str] = []
    state.grant = grants.append
    state.cancel = lambda: events.append("cancel")
    state.release = lambda: events.append("release")
    state.finished = codes.append
    state.opened = True
    return state, grants, events, codes


async def test_credit_is_topped_up_when_half_the_window_is_read() -> None:
    """Window 8: nothing is granted until 4 are read; then the total becomes read + 8."""
    state, grants, _, _ = opened(8)
    for i in range(8):
        state.chunk(b"%d" % i)
    for _ in range(3):
        await state.next()
    assert grants == []
    await state.next()
    assert grants == [12]
    for _ in range(3):
        await state.next()
    assert grants == [12]  # 12 - 7 = 5 still ahead
    await state.next()
    assert grants == [12, 16]


async def test_chunks_before_an_error_are_delivered_first() -> None:
    state, _, _, codes = opened(4)
    state.chunk(b"a")
    state.fail(PermissionDenied("no", rule="r"))
    assert await state.next() == b"a"
    with pytest.raises(PermissionDenied):
        await state.next()
    state.close()
    assert codes == ["PERMISSION_DENIED"]


async def test_a_reader_waits_for_the_next_chunk() -> None:
    state, *_ = opened(4)
    reader = asyncio.ensure_future(state.next())
    await asyncio.sleep(0)
    assert not reader.done()
    state.chunk(b"x")
    assert await reader == b"x"


async def test_closing_early_cancels_once_and_says_cancelled() -> None:
    state, _, events, codes = opened(4)
    state.chunk(b"a")
    state.close()
    state.close()
    assert events == ["cancel", "release"]
    assert codes == ["CANCELLED"]


async def test_closing_after_the_end_sends_no_cancel() -> None:
    state, grants, events, codes = opened(4)
    state.chunk(b"a")
    state.end()
    assert await state.next() == b"a"
    assert await state.next() is None
    assert grants == []  # no credit after the end
    state.close()
    assert events == ["release"]
    assert codes == ["OK"]


async def test_a_failure_after_the_end_changes_nothing() -> None:
    state, *_ = opened(4)
    state.end()
    state.fail(PermissionDenied("late"))
    assert await state.next() is None


def test_progress_reaches_the_hook_and_is_kept() -> None:
    seen: list[Progress] = []
    state = StreamState(4, seen.append)
    state.progressed(Progress(0.5, "half"))
    assert state.progress == Progress(0.5, "half") and seen == [Progress(0.5, "half")]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"fraction": 0.25, "note": "a"}', Progress(0.25, "a")),
        (b'{"fraction": 1}', Progress(1.0, "")),
        (b'{"fraction": 0, "note": "' + b"x" * 300 + b'"}', Progress(0.0, "x" * 256)),
        (b'{"fraction": 1.5}', None),
        (b'{"fraction": -0.1}', None),
        (b'{"fraction": true}', None),
        (b'{"fraction": "0.5"}', None),
        (b'{"fraction": 0.5, "note": 3}', None),
        (b"[0.5]", None),
        (b"not json", None),
    ],
)
def test_progress_bodies(body: bytes, expected: Progress | None) -> None:
    """A malformed report is ``None`` (dropped by the inbox), never an exception."""
    assert parse_progress(body) == expected


def test_json_chunks() -> None:
    parse = json_chunk("a.b")
    assert parse(b'{"x": 1}') == {"x": 1}
    with pytest.raises(InvalidArgument, match=r"chunk of a\.b is not JSON"):
        parse(b"{")


def test_reply_frames_carry_their_number_and_end() -> None:
    aad = reply_header(bytes(16), 1, "b", "b1", "a", "a1", bytes(16), "OK", 7, False)
    hdr, _ = decode_frame(aad + bytes(40))
    assert (hdr.kind, hdr.seq, hdr.end) == (Kind.REPLY, 7, False)


def test_a_cancel_has_no_credit_field() -> None:
    aad = control_header(bytes(16), 1, "a", "a1", "b", "b1", bytes(range(16)), "cancel")
    fields = msgpack.unpackb(aad[PREFIX_LEN:])
    assert "cr" not in fields and fields["op"] == "cancel" and fields["k"] == Kind.CONTROL
    hdr, _ = decode_frame(aad + bytes(40))
    assert (hdr.op, hdr.credit, hdr.reply_to) == ("cancel", None, bytes(range(16)))


class Q(BaseModel):
    n: int


class Chunk(BaseModel):
    i: int


def test_an_async_generator_endpoint_streams_its_annotated_chunks() -> None:
    agent = Agent("writer")

    @agent.endpoint
    async def count(q: Q, ctx: Context) -> AsyncIterator[Chunk]:
        yield Chunk(i=q.n)

    @agent.endpoint
    async def gen(q: Q) -> AsyncGenerator[Chunk, None]:
        yield Chunk(i=q.n)

    @agent.endpoint
    async def whole(q: Q) -> Chunk:
        return Chunk(i=q.n)

    specs = agent.endpoints
    assert (specs["count"].streams, specs["count"].output_type, specs["count"].wants_context) == (
        True,
        Chunk,
        True,
    )
    assert (specs["gen"].streams, specs["gen"].output_type) == (True, Chunk)
    assert specs["whole"].streams is False

    with pytest.raises(
        InvalidArgument, match=r"must be annotated to return AsyncIterator\[Model\]"
    ):

        @agent.endpoint
        async def untyped(q: Q):  # type: ignore[no-untyped-def]
            yield 1

    with pytest.raises(InvalidArgument, match="must be an async function"):

        @agent.endpoint  # type: ignore[type-var]
        def sync(q: Q) -> Chunk:
            return Chunk(i=1)


def test_a_request_asks_for_a_stream_or_progress_only_when_told() -> None:
    """``sm`` carries the credit (1 to 1024, the protocol's bound), ``pg`` the wish for
    progress frames; neither is sent otherwise."""
    assert MAX_CREDIT == 1024
    args = (bytes(16), 1, "a", "a1", "b", "b1", "ep", 2, 1, b"cert", None, None, None)
    plain = msgpack.unpackb(request_header(*args)[PREFIX_LEN:])
    asked = msgpack.unpackb(request_header(*args, None, False, 16, True)[PREFIX_LEN:])
    assert "sm" not in plain and "pg" not in plain
    assert (asked["sm"], asked["pg"]) == (16, True)
