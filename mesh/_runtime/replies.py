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
from dataclasses import dataclass

from mesh._core.crypto import open_frame
from mesh._core.envelope import Kind, decode_frame
from mesh._core.records import InstanceRecord
from mesh._runtime.ports import MeshStats
from mesh._transport.base import InboundMessage, is_no_responders
from mesh.errors import (
    DeadlineExceeded,
    DecodeError,
    Internal,
    MeshError,
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
    """

    fut: asyncio.Future[bytes | None]
    request_id: bytes
    record: InstanceRecord
    key: bytes
    hint: str | None = None
    no_responders: int = 0
    signalled: bool = False


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


def _expire(p: Pending, by_deadline: bool) -> None:
    fut = p.fut
    if fut.done():
        return
    message = (
        "no reply before the deadline" if by_deadline else "attempt timed out (per-try timeout)"
    )
    if p.hint is not None:
        message += f" (unauthenticated refusal received: {p.hint})"
    if p.no_responders:
        message += f" (no responders at instance {p.record.key}, {p.no_responders} times)"
    fut.set_exception(DeadlineExceeded(message) if by_deadline else Unavailable(message))


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
        self, request_id: bytes, record: InstanceRecord, key: bytes, wait: float, by_deadline: bool
    ) -> tuple[str, str, Pending, asyncio.TimerHandle]:
        """Register an attempt that gives up after ``wait`` seconds.

        Returns:
            ``(token, reply subject, pending attempt, its timer)``; pass the token and the
            timer to ``remove``.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        token = str(next(self._tokens))
        pending = self._pending[token] = Pending(fut, request_id, record, key)
        timer = loop.call_later(max(0.0, wait), _expire, pending, by_deadline)
        return token, f"{self.subject}.{token}", pending, timer

    def remove(self, token: str, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        del self._pending[token]

    def fail_instance(self, record: InstanceRecord) -> None:
        """Fail attempts waiting on an instance found dead by the signed directory (no
        heartbeat for ``ttl``), so they retry elsewhere now."""
        for p in list(self._pending.values()):
            if p.record.key == record.key and not p.fut.done():
                p.fut.set_exception(InstanceDown(f"instance {record.key} went away"))

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
        if p is None or p.fut.done():
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
        if hdr.status == OK:
            p.fut.set_result(plaintext)
            return
        p.fut.set_exception(remote_error(hdr.status or Internal.code, plaintext))

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
