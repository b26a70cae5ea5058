"""An in-memory ``Transport``: a broker in one process, for unit tests of the pure pipelines.

It implements the same interface as the nats-py transport (subjects with ``*`` and ``>``
wildcards, inboxes, "no responders", key-value buckets with history and watches, streams with
expected-last-sequence appends) with no server, so the runtime's client and server pipelines
can be tested in milliseconds. Integration tests use real nats-server processes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import FailedPrecondition

__all__ = ["MemoryTransport", "subject_matches"]


@dataclass
class _Msg:
    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class _MemSub:
    broker: _Broker
    subject: str
    queue: str
    handler: Callable[[Any], Awaitable[None]]
    inbox: asyncio.Queue[_Msg] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        # One message at a time per subscription, as nats-py delivers them.
        while True:
            msg = await self.inbox.get()
            try:
                with contextlib.suppress(Exception):
                    await self.handler(msg)
            finally:
                self.inbox.task_done()

    async def drain(self) -> None:
        if self in self.broker.subs:
            self.broker.subs.remove(self)
        await self.inbox.join()  # every delivered message handled
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        if self in self.broker.subs:
            self.broker.subs.remove(self)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class _MemKV:
    def __init__(self, history: int = 1) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.log: dict[str, list[tuple[bytes | None, int]]] = {}
        self.keep = max(1, history)
        self.seq = 0
        self.watchers: list[asyncio.Queue[tuple[str, bytes | None]]] = []

    def _write(self, key: str, value: bytes | None) -> int:
        self.seq += 1
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = (value, self.seq)
        self.log[key] = [*self.log.get(key, []), (value, self.seq)][-self.keep :]
        for q in self.watchers:
            q.put_nowait((key, value))
        return self.seq

    async def put(self, key: str, value: bytes) -> int:
        return self._write(key, value)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise FailedPrecondition(f"key {key!r} already exists")
        return self._write(key, value)

    async def create_fresh(self, key: str, value: bytes) -> int:
        if self.log.get(key):  # a value or a delete marker
            raise FailedPrecondition(f"key {key!r} is stored (or was deleted)")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        current = self.data.get(key)
        if current is None or current[1] != last:
            raise FailedPrecondition(f"key {key!r} changed since revision {last}")
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        self._write(key, None)

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        return self.data.get(key)

    async def get(self, key: str) -> bytes | None:
        found = self.data.get(key)
        return None if found is None else found[0]

    async def history(self, key: str) -> list[tuple[bytes | None, int]]:
        return list(self.log.get(key, []))

    async def items(self) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, (v, _rev) in self.data.items())

    async def watch(self, keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
        q: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
        self.watchers.append(q)
        try:
            for key, (value, _rev) in list(self.data.items()):
                if subject_matches(keys, key):
                    yield key, value
            yield None
            while True:
                item = await q.get()
                if subject_matches(keys, item[0]):
                    yield item
        finally:
            self.watchers.remove(q)


class _MemStream:
    def __init__(self) -> None:
        self.messages: dict[int, bytes] = {}
        self.seq = 0
        self.changed = asyncio.Event()

    async def append(self, data: bytes, *, expect_last: int | None = None) -> int:
        if expect_last is not None and expect_last != self.seq:
            raise FailedPrecondition(f"stream moved past sequence {expect_last}")
        self.seq += 1
        self.messages[self.seq] = data
        self.changed.set()
        self.changed = asyncio.Event()
        return self.seq

    async def last(self) -> tuple[int, bytes] | None:
        if not self.messages:
            return None
        seq = max(self.messages)
        return seq, self.messages[seq]

    async def read(self, start: int = 1) -> list[tuple[int, bytes]]:
        return sorted((s, d) for s, d in self.messages.items() if s >= start)

    async def follow(self, start: int = 1) -> AsyncIterator[tuple[int, bytes]]:
        nxt = start
        while True:
            for seq, data in await self.read(nxt):
                yield seq, data
                nxt = seq + 1
            await self.changed.wait()


@dataclass
class _Broker:
    subs: list[_MemSub] = field(default_factory=list)
    kvs: dict[str, _MemKV] = field(default_factory=dict)
    streams: dict[str, _MemStream] = field(default_factory=dict)
    rr: itertools.count[int] = field(default_factory=itertools.count)


class MemoryTransport:
    """An in-memory broker connection; transports made with the same ``broker`` see each other.

    Example::

        broker = MemoryTransport.new_broker()
        a = Mesh(id_a, agent=agent_a, transport=MemoryTransport(broker))
    """

    def __init__(self, broker: _Broker | None = None) -> None:
        self.broker = broker or _Broker()
        self._connected = False
        self._inboxes = itertools.count(1)
        self._prefix = f"_INBOX.{os.urandom(6).hex()}"
        self._mine: list[_MemSub] = []
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._on_disconnect: list[Callable[[], Awaitable[None]]] = []

    @staticmethod
    def new_broker() -> _Broker:
        """A fresh shared broker."""
        return _Broker()

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        for sub in list(self._mine):
            await sub.unsubscribe()
        self._connected = False

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        msg = _Msg(subject, bytes(payload), reply, dict(headers) if headers else None)
        plain: list[_MemSub] = []
        groups: dict[str, list[_MemSub]] = {}
        for sub in self.broker.subs:
            if subject_matches(sub.subject, subject):
                if sub.queue:
                    groups.setdefault(sub.queue, []).append(sub)
                else:
                    plain.append(sub)
        targets = plain + [g[next(self.broker.rr) % len(g)] for g in groups.values()]
        for sub in targets:
            sub.inbox.put_nowait(msg)
        if not targets and reply:
            await self.publish(reply, b"", headers={"Status": "503"})

    async def subscribe(
        self, subject: str, handler: Callable[[Any], Awaitable[None]], *, queue: str = ""
    ) -> _MemSub:
        sub = _MemSub(self.broker, subject, queue, handler)
        sub.task = asyncio.create_task(sub._pump())
        self.broker.subs.append(sub)
        self._mine.append(sub)
        return sub

    def new_inbox(self) -> str:
        return f"{self._prefix}.{next(self._inboxes)}"

    async def flush(self, timeout: float = 5.0) -> None:
        await asyncio.sleep(0)

    async def key_value(
        self,
        bucket: str,
        *,
        ttl: float | None = None,
        replicas: int | None = None,
        history: int = 1,
    ) -> _MemKV:
        return self.broker.kvs.setdefault(bucket, _MemKV(history))

    def forget_bucket(self, bucket: str) -> None:
        return None  # nothing cached: ``key_value`` looks the broker up every time

    async def bucket_id(self, bucket: str) -> str | None:
        kv = self.broker.kvs.get(bucket)
        return None if kv is None else str(id(kv))

    async def stream_id(self, name: str) -> str | None:
        stream = self.broker.streams.get(name)
        return None if stream is None else str(id(stream))

    async def stream(self, name: str, subject: str, *, replicas: int | None = None) -> _MemStream:
        return self.broker.streams.setdefault(name, _MemStream())

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_reconnect.append(callback)

    def on_disconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_disconnect.append(callback)

    async def reconnect(self) -> None:
        """Act out a lost and re-established connection (for tests): the disconnect callbacks,
        then the reconnect callbacks; nothing published is lost here."""
        for cb in self._on_disconnect:
            await cb()
        for cb in self._on_reconnect:
            await cb()


# --- a server from testcontainers ---------------------------------------------------------
