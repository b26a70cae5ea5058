"""The caller's inbox: attempts waiting for replies, and how what arrives there is validated.

Each attempt registers a token; the reply subject is ``<inbox>.<token>``. What arrives is
checked in the order of ``docs/protocol.md`` section 13 (decode, kind, ids, size, then the seal
under the pair key of the instance the attempt went to) before it resolves the attempt. Forged,
misaddressed or malformed messages are dropped and counted; the attempt keeps waiting for the
real reply until its timer fires.

Only a sealed reply (or signed directory evidence) ends an attempt early. An unsealed REFUSAL
is kept as a hint, quoted if the attempt times out; a NATS "no responders" status resolves the
attempt's future with ``None`` (and arms a fresh one, so a reply arriving meanwhile is kept):
the client re-sends the same frame to the same instance until the signed directory says it is
gone.

Attempts are woken the same way, with a reason in ``woken``, when what was in flight may have
been lost: ``LOST`` when this connection to NATS dropped (requests or replies may be gone; a
call that is safe to retry makes a fresh attempt), ``MOVED`` when the instance's signed beat
says its own connection was re-established (the same frame is sent again at once).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

from mesh._core.crypto import open_frame
from mesh._core.envelope import PROGRESS, Kind, decode_frame
from mesh._core.records import InstanceRecord
from mesh._runtime.ports import MeshStats
from mesh._runtime.streams import Progress, StreamState, parse_progress
from mesh._transport.base import InboundMessage, is_no_responders
from mesh.errors import (
    DeadlineExceeded,
    DecodeError,
    Internal,
    MeshError,
    StreamBroken,
    Unauthenticated,
    Unavailable,
    error_from_code,
)

__all__ = ["LOST", "MOVED", "Inbox", "InstanceDown", "NotDelivered", "Pending", "remote_error"]

OK = "OK"
LOST = "lost"
MOVED = "moved"
MAX_HINT = 200
"""Characters of an unsealed refusal's text kept to quote: it is whatever a forger wrote."""


class _NoTimer:
    def cancel(self) -> None:
        pass


_NO_TIMER: asyncio.TimerHandle = _NoTimer()  # type: ignore[assignment]


class NotDelivered(Unavailable):
    """Nothing was sent (no live instance), so retrying is safe for any endpoint."""


class InstanceDown(Unavailable):
    """Signed evidence that the instance is gone: its heartbeats stopped, or it announced
    draining while the attempt got "no responders"."""


@dataclass(slots=True)
class Pending:
    """One attempt waiting on the inbox.

    Attributes:
        fut: resolves with the reply body, an error, or ``None`` for "no responders" (then
            ``signalled`` is set and ``fut`` is already a fresh future).
        hint: the last unsealed refusal, as ``CODE: message``.
        no_responders: how many "no responders" statuses arrived.
        timer: fires at ``expires`` (loop time), or earlier after ``idle`` seconds of silence.
        stream: the chunks of a streamed call; ``on_progress``: the caller's progress hook.
            Either makes the reply frames sequenced: ``next_sq`` is the one expected.
    """

    fut: asyncio.Future[bytes | None]
    request_id: bytes
    record: InstanceRecord
    key: bytes
    timer: asyncio.TimerHandle
    expires: float
    by_deadline: bool
    hint: str | None = None
    no_responders: int = 0
    signalled: bool = False
    stream: StreamState | None = None
    on_progress: Callable[[Progress], None] | None = None
    idle: float | None = None
    sequenced: bool = False
    next_sq: int = 0


def remote_error(code: str, body: bytes) -> MeshError:
    """The exception for a sealed error reply; fields of the wrong type are ignored."""
    try:
        detail = json.loads(body)
    except ValueError:
        detail = None
    if not isinstance(detail, dict):
        return Internal(f"malformed error reply ({code})")
    message, rule, after = detail.get("message"), detail.get("rule"), detail.get("retry_after")
    return error_from_code(
        code,
        message if isinstance(message, str) else "",
        rule=rule if isinstance(rule, str) else None,
        retry_after=float(after)
        if isinstance(after, int | float) and not isinstance(after, bool) and after >= 0
        else None,
    )


def _expire(p: Pending) -> None:
    fut, stream = p.fut, p.stream
    opened = stream is not None and stream.opened
    if fut.done() and not opened:
        return
    idle = p.idle is not None and fut.get_loop().time() < p.expires - 0.001
    if idle:
        message = f"nothing arrived for {p.idle:g} s (the call's idle timeout)"
    elif opened:
        message = "the stream did not end before the deadline"
    elif p.by_deadline:
        message = "no reply before the deadline"
    else:
        message = "attempt timed out (per-try timeout)"
    if p.hint is not None:
        message += f" (unauthenticated refusal received: {p.hint})"
    if p.no_responders:
        message += f" (no responders at instance {p.record.key}, {p.no_responders} times)"
    exc = DeadlineExceeded(message) if p.by_deadline or idle else Unavailable(message)
    if opened:
        assert stream is not None
        stream.fail(exc)
    else:
        fut.set_exception(exc)


class Inbox:
    """The attempts of one connection waiting for replies.

    Args:
        instance: this instance's id (replies must be addressed to it).
        max_sealed: the largest sealed reply body opened.
        stats: where dropped replies, refusal hints and "no responders" are counted.
    """

    def __init__(
        self,
        instance: str,
        max_sealed: int,
        stats: MeshStats,
    ) -> None:
        self.subject = ""
        self._instance = instance
        self._max_sealed = max_sealed
        self._stats = stats
        self._pending: dict[str, Pending] = {}
        self._tokens = itertools.count(1)
        self.woken: dict[str, str] = {}
        """Why an attempt was woken other than by "no responders", by token (``LOST``,
        ``MOVED``); the attempt takes its entry, stale ones are pruned at the next wake."""
        self._in_flight: list[str] = []  # the tokens waiting when the connection was lost

    def add(
        self,
        request_id: bytes,
        record: InstanceRecord,
        key: bytes,
        wait: float,
        by_deadline: bool,
        *,
        stream: StreamState | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        idle: float | None = None,
    ) -> tuple[str, str, Pending]:
        """Register an attempt that gives up after ``wait`` seconds (or ``idle`` seconds
        without a frame, when set).

        Returns:
            ``(token, reply subject, pending attempt)``; pass the token to ``remove``.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        token = str(next(self._tokens))
        expires = loop.time() + max(0.0, wait)
        first = wait if idle is None else min(wait, idle)
        timer = _NO_TIMER
        pending = self._pending[token] = Pending(
            fut, request_id, record, key, timer, expires, by_deadline
        )
        if stream is not None or on_progress is not None or idle is not None:
            pending.stream, pending.on_progress, pending.idle = stream, on_progress, idle
            pending.sequenced = True
        pending.timer = loop.call_later(max(0.0, first), _expire, pending)
        return token, f"{self.subject}.{token}", pending

    def remove(self, token: str) -> None:
        p = self._pending.pop(token, None)
        if p is not None:
            p.timer.cancel()

    def keep_until(self, p: Pending, deadline_wait: float) -> None:
        """An opened stream lives until its deadline: the per-try timeout no longer applies."""
        p.expires = p.fut.get_loop().time() + max(0.0, deadline_wait)
        p.by_deadline = True
        self._arm(p)

    def _arm(self, p: Pending) -> None:
        loop = p.fut.get_loop()
        p.timer.cancel()
        wait = p.expires - loop.time()
        if p.idle is not None:
            wait = min(wait, p.idle)
        p.timer = loop.call_later(max(0.0, wait), _expire, p)

    def fail_instance(self, record: InstanceRecord) -> None:
        """Fail attempts waiting on an instance found dead by the signed directory (no
        heartbeat for ``ttl``), so they retry elsewhere now."""
        for p in list(self._pending.values()):
            if p.record.key != record.key:
                continue
            if not p.fut.done():
                p.fut.set_exception(InstanceDown(f"instance {record.key} went away"))
            elif p.stream is not None:
                p.stream.fail(InstanceDown(f"instance {record.key} went away mid-stream"))

    def connection_lost(self) -> None:
        """This connection to NATS dropped: remember what was waiting (those requests, or
        their replies, may be lost; what is sent meanwhile is buffered and goes out after)."""
        if not self._in_flight:
            self._in_flight = list(self._pending)

    def reconnected(self) -> None:
        """The connection is back: wake the attempts that were waiting when it dropped."""
        tokens, self._in_flight = self._in_flight, []
        self._wake(tokens, LOST)

    def instance_reconnected(self, record: InstanceRecord) -> None:
        """The instance's signed beat says its connection was re-established: requests sent
        to it before may have been lost, so its waiting attempts send their frame again."""
        key = record.key
        self._wake([t for t, p in self._pending.items() if p.record.key == key], MOVED)

    def _wake(self, tokens: list[str], reason: str) -> None:
        pending, woken = self._pending, self.woken
        for token in [t for t in woken if t not in pending]:
            del woken[token]
        for token in tokens:
            p = pending.get(token)
            if p is None or p.fut.done():
                continue
            if woken.get(token) != LOST:  # a lost connection decides more than a moved one
                woken[token] = reason
            if not p.signalled:
                p.signalled = True
                fut = p.fut
                p.fut = fut.get_loop().create_future()
                fut.set_result(None)

    async def on_reply(self, msg: InboundMessage) -> None:
        """Validate what arrived for an attempt (``docs/protocol.md`` section 13)."""
        p = self._pending.get(msg.subject[len(self.subject) + 1 :])
        if p is None or (p.fut.done() and (p.stream is None or p.stream.ended)):
            return  # late, duplicate or stray
        if is_no_responders(msg):
            self._no_responders(p)
            return
        data = msg.data
        try:
            hdr, end = decode_frame(data)
        except DecodeError:
            self._stats.dropped_replies += 1
            return
        if hdr.kind == Kind.REFUSAL and hdr.reply_to == p.request_id:
            # Unsealed: anyone can forge it, so it never ends the attempt (the handler may be
            # running). Kept to explain a timeout: a genuine one means no reply will come.
            p.hint = f"{hdr.status or Internal.code}: {hdr.message or 'refused'}"[:MAX_HINT]
            self._stats.refusal_hints += 1
            return
        if (
            hdr.kind != Kind.REPLY
            or hdr.reply_to != p.request_id
            or hdr.from_instance != p.record.instance
            or hdr.to_instance != self._instance
        ):
            self._stats.dropped_replies += 1
            return
        if len(data) - end > self._max_sealed:
            self._stats.dropped_replies += 1  # over our limit: not opened, like a forgery
            return
        try:
            plaintext = open_frame(p.key, data, end)
        except Unauthenticated:
            self._stats.dropped_replies += 1  # forged or altered; keep waiting for the real one
            return
        if p.sequenced:
            self._sequenced(p, hdr.seq, hdr.end is True, hdr.status or Internal.code, plaintext)
            return
        if hdr.status == OK:
            p.fut.set_result(plaintext)
            return
        p.fut.set_exception(remote_error(hdr.status or Internal.code, plaintext))

    def _sequenced(self, p: Pending, sq: int | None, end: bool, status: str, body: bytes) -> None:
        """A sealed frame of a call whose reply comes in several (a stream, or progress
        reports before the reply): frames count up from 0 (``docs/protocol.md`` section 21).

        A frame older than the next expected one is a copy (a replay): dropped. In a stream,
        a newer one means one went missing or came out of order: the stream is broken, since
        chunks must not be skipped; before a whole reply only progress can be missed, so it
        is accepted.
        """
        stream = p.stream
        if sq is None or sq < p.next_sq:
            self._stats.dropped_replies += 1
            return
        if sq > p.next_sq and stream is not None:
            self._broken(p, f"frame {p.next_sq} is missing (frame {sq} arrived)")
            return
        p.next_sq = sq + 1
        if p.idle is not None:
            self._arm(p)
        if status == PROGRESS and not end:
            progress = parse_progress(body)
            if progress is None:
                self._stats.dropped_replies += 1
            elif stream is not None:
                stream.progressed(progress)
            elif p.on_progress is not None:
                p.on_progress(progress)
            return
        if stream is None:
            if not end:
                return  # not a progress report and not the reply: nothing a whole call takes
            if status == OK:
                p.fut.set_result(body)
            else:
                p.fut.set_exception(remote_error(status, body))
            return
        if not end:
            if status != OK:
                self._broken(p, f"frame {sq} is neither a chunk nor the end ({status})")
            elif stream.received >= stream.granted:
                self._broken(p, f"the callee sent more than the {stream.granted} chunks granted")
            else:
                stream.chunk(body)
                self._open(p)
            return
        if status == OK:
            stream.end()
            self._open(p)
        elif stream.opened:
            stream.fail(remote_error(status, body), answered=True)
        else:
            p.fut.set_exception(remote_error(status, body))

    def _open(self, p: Pending) -> None:
        stream = p.stream
        if stream is not None and not stream.opened:
            stream.opened = True
            p.fut.set_result(b"")

    def _broken(self, p: Pending, why: str) -> None:
        self._stats.dropped_replies += 1
        exc = StreamBroken(f"stream from {p.record.key} broken: {why}")
        stream = p.stream
        if stream is not None and stream.opened:
            stream.fail(exc)
        elif not p.fut.done():
            p.fut.set_exception(exc)

    def _no_responders(self, p: Pending) -> None:
        """Wake the attempt (it re-sends its frame) and keep listening for its reply.

        The status is unauthenticated: the request may have been delivered all the same, so
        the attempt is not failed; a fresh future replaces the one woken, so that a reply
        arriving before the attempt runs again is not lost.
        """
        p.no_responders += 1
        self._stats.no_responders += 1
        if p.signalled:
            return  # the attempt has not handled the previous one yet
        p.signalled = True
        woken = p.fut
        p.fut = woken.get_loop().create_future()
        woken.set_result(None)
