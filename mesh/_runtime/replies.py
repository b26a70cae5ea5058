"""The caller's inbox: attempts waiting for replies, and how what arrives there is validated.

Each attempt registers a token; the reply subject is ``<inbox>.<token>``. What arrives is
checked in the order of ``docs/protocol.md`` section 13 (decode, kind, ids, size, then the seal
under the pair key of the instance the attempt went to) before it resolves the attempt. Forged,
misaddressed or malformed messages are dropped and counted; the attempt keeps waiting for the
real reply until its timer fires.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

from mesh._core.crypto import open_frame
from mesh._core.envelope import Kind, decode_frame
from mesh._core.records import STATE_DRAINING, InstanceRecord
from mesh._runtime.directory import Directory
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

__all__ = ["Inbox", "InstanceDown", "NotDelivered", "remote_error"]

OK = "OK"


class NotDelivered(Unavailable):
    """Nothing was sent (no live instance), so retrying is safe for any endpoint."""


class InstanceDown(Unavailable):
    """The instance seems gone: "no responders", or its heartbeats stopped. The first signal
    is unauthenticated, so it never by itself moves a keyed call to another instance."""


@dataclass(slots=True)
class Pending:
    """One attempt waiting on the inbox."""

    fut: asyncio.Future[bytes]
    request_id: bytes
    record: InstanceRecord
    key: bytes


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


def _expire(fut: asyncio.Future[bytes], by_deadline: bool) -> None:
    if not fut.done():
        fut.set_exception(
            DeadlineExceeded("no reply before the deadline")
            if by_deadline
            else Unavailable("attempt timed out (per-try timeout)")
        )


class Inbox:
    """The attempts of one connection waiting for replies.

    Args:
        instance: this instance's id (replies must be addressed to it).
        max_sealed: the largest sealed reply body opened.
        stats: where dropped replies are counted.
        directory: the live view, told when "no responders" shows an instance is gone.
        eject_for: seconds an instance is set aside after "no responders".
    """

    def __init__(
        self,
        instance: str,
        max_sealed: int,
        stats: MeshStats,
        directory: Callable[[], Directory],
        eject_for: float,
    ) -> None:
        self.subject = ""
        self._instance = instance
        self._max_sealed = max_sealed
        self._stats = stats
        self._directory = directory
        self._eject_for = eject_for
        self._pending: dict[str, Pending] = {}
        self._tokens = itertools.count(1)

    def add(
        self, request_id: bytes, record: InstanceRecord, key: bytes, wait: float, by_deadline: bool
    ) -> tuple[str, str, Pending, asyncio.TimerHandle]:
        """Register an attempt that gives up after ``wait`` seconds.

        Returns:
            ``(token, reply subject, pending attempt, its timer)``; pass the token and the
            timer to ``remove``.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        token = str(next(self._tokens))
        pending = self._pending[token] = Pending(fut, request_id, record, key)
        timer = loop.call_later(max(0.0, wait), _expire, fut, by_deadline)
        return token, f"{self.subject}.{token}", pending, timer

    def remove(self, token: str, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        del self._pending[token]

    def fail_instance(self, record: InstanceRecord) -> None:
        """Fail attempts waiting on an instance that is gone, so they retry elsewhere now."""
        for p in list(self._pending.values()):
            if p.record.key == record.key and not p.fut.done():
                p.fut.set_exception(InstanceDown(f"instance {record.key} went away"))

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
            # Unsealed: the callee could not authenticate the request. Trusted only as a hint.
            p.fut.set_exception(
                error_from_code(
                    hdr.status or "INTERNAL",
                    hdr.message or "refused",
                    rule=hdr.rule,
                    retry_after=hdr.retry_after_ms / 1000 if hdr.retry_after_ms else None,
                )
            )
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
        record = p.record
        p.fut.set_exception(InstanceDown(f"no responders at instance {record.key}"))
        directory = self._directory()
        live = directory.get(record.key)
        if live is not None and live.state != STATE_DRAINING:
            # Listed as serving but not subscribed: the process is gone. Stop picking it, and
            # fail other attempts waiting on it so they retry elsewhere at once.
            directory.eject(record.key, self._eject_for)
            self.fail_instance(record)
