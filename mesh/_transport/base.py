"""The transport interface: what the runtime needs of a broker, with no ``nats`` import.

The runtime sees a narrow interface (``Transport``): publish, subscribe, inboxes, and JetStream
key-value buckets and streams with watches. ``mesh._transport.nats`` implements it over nats-py
(the only module that imports ``nats``); ``mesh._transport.memory`` implements it in memory for
unit tests of the pure pipelines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

__all__ = [
    "InboundMessage",
    "KeyValueBucket",
    "Stream",
    "Subscription",
    "Transport",
    "is_no_responders",
]

STATUS_HEADER = "Status"
NO_RESPONDERS = "503"


class InboundMessage(Protocol):
    """What a subscription handler receives (nats-py's ``Msg`` satisfies it)."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


Handler = Callable[[Any], Awaitable[None]]


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...

    async def drain(self) -> None:
        """Stop interest but handle the messages already delivered."""


class KeyValueBucket(Protocol):
    """A key-value bucket with per-key revisions.

    ``watch`` yields ``(key, value)`` pairs, ``value`` being ``None`` for a deletion, and one
    bare ``None`` once the values present when the watch started have all been delivered.
    ``create`` and ``update`` are compare-and-set: they raise ``FailedPrecondition`` when the
    key exists, or when its revision is not ``last``.
    """

    async def put(self, key: str, value: bytes) -> int: ...

    async def create(self, key: str, value: bytes) -> int: ...

    async def update(self, key: str, value: bytes, last: int) -> int: ...

    async def create_fresh(self, key: str, value: bytes) -> int:
        """``create``, but a deleted key counts as existing: it fails (``FailedPrecondition``)
        while anything about the key is stored, its delete or purge marker included, so a
        deletion cannot be mistaken for a key never written."""
        ...

    async def delete(self, key: str) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def entry(self, key: str) -> tuple[bytes, int] | None: ...

    async def history(self, key: str) -> list[tuple[bytes | None, int]]: ...

    async def items(self) -> list[tuple[str, bytes]]: ...

    def watch(self, keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
        """Watch the keys the pattern ``keys`` matches (NATS subject wildcards)."""
        ...


class Stream(Protocol):
    """An append-only JetStream stream (the audit log)."""

    async def append(self, data: bytes, *, expect_last: int | None = None) -> int:
        """Append; with ``expect_last`` only if the last sequence is that (else
        ``FailedPrecondition``). Returns the new sequence."""

    async def last(self) -> tuple[int, bytes] | None: ...

    async def read(self, start: int = 1) -> list[tuple[int, bytes]]:
        """Every stored message from ``start`` on, as ``(sequence, data)``."""

    def follow(self, start: int = 1) -> AsyncIterator[tuple[int, bytes]]: ...


class Transport(Protocol):
    """The runtime's view of the broker."""

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None: ...

    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str = ""
    ) -> Subscription: ...

    def new_inbox(self) -> str: ...

    async def flush(self, timeout: float = 5.0) -> None: ...

    async def key_value(
        self,
        bucket: str,
        *,
        ttl: float | None = None,
        replicas: int | None = None,
        history: int = 1,
    ) -> KeyValueBucket:
        """The bucket, created if missing. ``replicas=None``: 3 when the server is in a
        cluster of three or more, else 1. An existing bucket with fewer replicas than asked is
        scaled up (or, if the server refuses, used as it is with a warning)."""
        ...

    def forget_bucket(self, bucket: str) -> None:
        """Drop a cached bucket object: the next ``key_value(bucket)`` opens (or re-creates)
        the bucket afresh, e.g. after someone deleted it."""
        ...

    async def bucket_id(self, bucket: str) -> str | None:
        """What tells this incarnation of the key-value bucket from a re-created one (its
        creation time), or ``None`` if the bucket does not exist now.

        Raises:
            Unavailable: JetStream could not be asked.
        """
        ...

    async def stream_id(self, name: str) -> str | None:
        """An identifier of the stream's current incarnation (``None`` if it does not exist):
        it changes when the stream is deleted and created again."""
        ...

    async def stream(self, name: str, subject: str, *, replicas: int | None = None) -> Stream:
        """The stream, created if missing; ``replicas`` as for ``key_value``."""
        ...

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the connection is re-established (subscriptions are back)."""
        ...

    def on_disconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` when the connection is lost (before reconnecting): until the
        reconnect, nothing is heard and what was in flight may be lost."""
        ...


def is_no_responders(msg: InboundMessage) -> bool:
    """Whether ``msg`` is the server's "no responders" status for a request."""
    headers = msg.headers
    return bool(headers) and not msg.data and headers.get(STATUS_HEADER) == NO_RESPONDERS  # type: ignore[union-attr]
