"""``Transport`` over nats-py: the only module that imports ``nats``.

nats-py's errors become mesh errors here (``Unavailable`` for anything the broker or the
connection failed at, ``FailedPrecondition`` for a compare-and-set that lost or a server
without JetStream), with messages that say what to do: nothing listening at a URL fails at
once, not after the connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue as NatsKeyValue

from mesh._log import get_logger
from mesh._transport.base import Handler, KeyValueBucket, Stream, Subscription
from mesh.errors import FailedPrecondition, MeshError, Unavailable

__all__ = ["NATS_ERRORS", "NatsTransport", "map_nats_errors", "mesh_error"]

log = get_logger(__name__)

MAX_WATCHERS = 100_000
"""The consumers a mesh store may have (``max_consumers`` of its stream): each mesh process
watches the head and policy stores, and a caller watches the directory once per agent it calls.
nats-server 2.15 limits a stream that sets none to 1,000 (and reads 0 or -1 as "its default"),
which would refuse the 1,001st process's watches."""

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream API errors: wrong last sequence


NATS_ERRORS = (TimeoutError, OSError, nats.errors.Error, nats.js.errors.Error)
"""What nats-py raises when the connection, the server or JetStream fails."""


_ERRNO = re.compile(r"\[Errno (\d+)\]")


def _shown(url: str) -> str:
    """A server URL for a message: without the user and password it may carry."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def refused(exc: BaseException) -> bool:
    """Whether connecting failed because nothing listens there (``ECONNREFUSED``), also when
    asyncio tried several addresses (``localhost``: ::1 and 127.0.0.1) and every one refused."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    if isinstance(exc, OSError) and exc.errno is None:  # "Multiple exceptions: [Errno 111] ..."
        codes = _ERRNO.findall(str(exc))
        return bool(codes) and all(int(c) == errno.ECONNREFUSED for c in codes)
    return False


def mesh_error(
    exc: BaseException,
    what: str,
    *,
    conflict: str | None = None,
    subject: str | None = None,
    servers: Sequence[str] = (),
    jetstream_off_at: str | None = None,
) -> MeshError:
    """The one place nats-py's errors become mesh errors.

    Args:
        exc: what nats-py raised (one of ``NATS_ERRORS``).
        what: the operation, for the message (``"key-value put 'x'"``).
        conflict: the message of a lost compare-and-set (a wrong last sequence); without it
            such an error is ``Unavailable`` like any other.
        subject: the subject involved, carried by the error.
        servers: for the first connection, the URLs it tried.
        jetstream_off_at: the URL of the connected server when its INFO says JetStream is not
            enabled: a JetStream call nobody answered (``ServiceUnavailableError``) then says
            so and how to fix it.

    Returns:
        ``FailedPrecondition`` for a lost compare-and-set (``conflict`` given) or a JetStream
        call to a server without JetStream, else ``Unavailable`` (for a refused first
        connection: "nothing is listening at ...").
    """
    if conflict is not None and (
        isinstance(exc, nats.js.errors.KeyWrongLastSequenceError)
        or (isinstance(exc, nats.js.errors.APIError) and exc.err_code in _WRONG_LAST_SEQUENCE)
    ):
        return FailedPrecondition(conflict)
    if jetstream_off_at is not None and isinstance(
        exc, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError
    ):
        # Not retryable: waiting does not enable JetStream.
        return FailedPrecondition(
            f"{what} failed: JetStream is not enabled on the NATS server at "
            f"{jetstream_off_at}: start nats-server with -js"
        )
    if servers:
        urls = ", ".join(map(_shown, servers))
        if refused(exc):
            return Unavailable(
                f"nothing is listening at {urls}: connection refused "
                "(start nats-server, or check --servers / MESH_SERVERS)"
            )
        return Unavailable(f"cannot connect to NATS at {urls}: {str(exc) or 'timed out'}")
    return Unavailable(f"{what} failed: {str(exc) or type(exc).__name__}", subject=subject)


@contextlib.contextmanager
def map_nats_errors(
    what: str,
    *,
    conflict: str | None = None,
    subject: str | None = None,
    jetstream_off_at: str | None = None,
) -> Iterator[None]:
    """Raise ``mesh_error(...)`` for what nats-py raises inside the block (off the hot path:
    a context manager costs a few microseconds per use).

    Raises:
        FailedPrecondition: a compare-and-set lost (``conflict`` given), or JetStream is not
            enabled on the server (``jetstream_off_at`` given).
        Unavailable: the connection, the server or JetStream failed or timed out.
    """
    try:
        yield
    except NATS_ERRORS as exc:
        raise mesh_error(
            exc, what, conflict=conflict, subject=subject, jetstream_off_at=jetstream_off_at
        ) from exc


class _NatsKV:
    def __init__(self, kv: NatsKeyValue) -> None:
        self._kv = kv

    async def put(self, key: str, value: bytes) -> int:
        with map_nats_errors(f"key-value put {key!r}"):
            return await self._kv.put(key, value)

    async def create(self, key: str, value: bytes) -> int:
        with map_nats_errors(f"key-value create {key!r}", conflict=f"key {key!r} already exists"):
            return await self._kv.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        changed = f"key {key!r} changed since revision {last}"
        with map_nats_errors(f"key-value update {key!r}", conflict=changed):
            return await self._kv.update(key, value, last=last)

    async def create_fresh(self, key: str, value: bytes) -> int:
        # Expected last subject sequence 0, without nats-py's ``create`` fallback that
        # overwrites a delete marker: a marker is something stored about the key.
        stored = f"key {key!r} is stored (or was deleted)"
        with map_nats_errors(f"key-value create {key!r}", conflict=stored):
            return await self._kv.update(key, value, last=0)

    async def delete(self, key: str) -> None:
        with map_nats_errors(f"key-value delete {key!r}"):
            await self._kv.delete(key)

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        with map_nats_errors(f"key-value get {key!r}"):
            try:
                entry = await self._kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
        return entry.value or b"", entry.revision or 0

    async def get(self, key: str) -> bytes | None:
        found = await self.entry(key)
        return None if found is None else found[0]

    async def history(self, key: str) -> list[tuple[bytes | None, int]]:
        with map_nats_errors(f"key-value history {key!r}"):
            try:
                entries = await self._kv.history(key)
            except nats.js.errors.NoKeysError:
                return []
        return [
            (None if e.operation in ("DEL", "PURGE") else (e.value or b""), e.revision or 0)
            for e in entries
        ]

    async def items(self) -> list[tuple[str, bytes]]:
        out: dict[str, bytes] = {}
        async for item in self.watch():
            if item is None:
                break
            key, value = item
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return sorted(out.items())

    async def watch(self, keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
        with map_nats_errors("key-value watch"):
            watcher = await self._kv.watch(keys)
        try:
            while True:
                with map_nats_errors("key-value watch"):  # a consumer lost mid-watch, too
                    try:
                        entry = await watcher.__anext__()  # type: ignore[no-untyped-call]
                    except StopAsyncIteration:
                        return
                if entry is None:  # end of the initial values
                    yield None
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                yield entry.key, None if deleted else (entry.value or b"")
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


class _NatsStream:
    def __init__(self, js: JetStreamContext, name: str, subject: str) -> None:
        self._js = js
        self._name = name
        self._subject = subject

    async def append(self, data: bytes, *, expect_last: int | None = None) -> int:
        headers = None if expect_last is None else {"Nats-Expected-Last-Sequence": str(expect_last)}
        moved = f"stream {self._name} moved past sequence {expect_last}"
        with map_nats_errors(f"append to stream {self._name}", conflict=moved):
            ack = await self._js.publish(self._subject, data, stream=self._name, headers=headers)
        return int(ack.seq)

    async def last(self) -> tuple[int, bytes] | None:
        with map_nats_errors(f"reading stream {self._name}"):
            try:
                info = await self._js.stream_info(self._name)
                last = info.state.last_seq
                if not last or not info.state.messages:
                    return None
                try:
                    msg = await self._js.get_msg(self._name, last)
                except nats.js.errors.NotFoundError:
                    return last, b""  # the last record was deleted; the chain will show it
            except nats.js.errors.NotFoundError:
                return None
        return int(msg.seq or last), msg.data or b""

    async def read(self, start: int = 1) -> list[tuple[int, bytes]]:
        with map_nats_errors(f"reading stream {self._name}"):
            info = await self._js.stream_info(self._name)
            out = []
            for seq in range(max(start, info.state.first_seq or 1), info.state.last_seq + 1):
                try:
                    msg = await self._js.get_msg(self._name, seq)
                except nats.js.errors.NotFoundError:
                    continue  # deleted: the caller sees the gap in sequence numbers
                out.append((seq, msg.data or b""))
        return out

    async def follow(self, start: int = 1) -> AsyncIterator[tuple[int, bytes]]:
        with map_nats_errors(f"following stream {self._name}"):
            sub = await self._js.subscribe(
                self._subject,
                stream=self._name,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=max(1, start)),
            )
        try:
            async for msg in sub.messages:
                yield int(msg.metadata.sequence.stream), msg.data
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def cancel_quietly(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it, whatever it raises."""
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


class NatsTransport:
    """``Transport`` over a nats-py connection.

    Args:
        servers: NATS URLs (several for a cluster; the client fails over).
        name: connection name shown by NATS monitoring.
        connect_timeout: seconds to wait for the first connection.
        options: further ``nats.connect`` keyword arguments (TLS, credentials).
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        name: str = "mesh",
        connect_timeout: float = 10.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self._servers = list(servers)
        self._name = name
        self._connect_timeout = connect_timeout
        self._options = options or {}
        self._nc: Client | None = None
        self._reconnect_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._disconnect_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._kvs: dict[str, _NatsKV] = {}

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise FailedPrecondition("transport is not connected")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        """The first connection: refused by every server, it fails at once; otherwise it
        fails after ``connect_timeout``.

        Raises:
            Unavailable: nothing is listening (at once), or no server answered in time.
        """

        async def reconnected() -> None:
            for cb in self._reconnect_callbacks:
                await cb()

        async def disconnected() -> None:
            if self._nc is None or self._nc.is_closed:
                return  # the first connection, or closing: nothing will be re-established
            for cb in self._disconnect_callbacks:
                await cb()

        # nats-py retries a first connection forever when reconnects are unbounded (the
        # loop in Client.connect / _select_next_server, reporting each failure to error_cb).
        # Its own bounds (allow_reconnect=False, max_reconnect_attempts) would also bound the
        # reconnects of the established connection, so the bounds are here: the connect
        # timeout, and a refusal by every server in turn, which no retry within the
        # timeout is likely to change (nothing listens there).
        hopeless: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        refusals = 0

        async def error_cb(exc: Exception) -> None:
            # nats-py reports transient socket errors here; the reconnect logic handles them.
            nonlocal refusals
            if hopeless.done() or self._nc is not None:
                return
            refusals = refusals + 1 if refused(exc) else 0
            if refusals >= len(self._servers):
                hopeless.set_result(exc)

        attempt = asyncio.ensure_future(self._connect(reconnected, disconnected, error_cb))
        try:
            racing: set[asyncio.Future[Any]] = {attempt, hopeless}
            done, _ = await asyncio.wait(
                racing, timeout=self._connect_timeout, return_when="FIRST_COMPLETED"
            )
            if attempt in done:
                self._nc = attempt.result()
                return
            error: BaseException = hopeless.result() if hopeless in done else TimeoutError()
        except NATS_ERRORS as exc:
            error = exc
        finally:
            if not attempt.done():
                await cancel_quietly(attempt)
        raise mesh_error(error, "connect", servers=self._servers) from error

    async def _connect(
        self,
        reconnected: Callable[[], Awaitable[None]],
        disconnected: Callable[[], Awaitable[None]],
        error_cb: Callable[[Exception], Awaitable[None]],
    ) -> Client:
        return await nats.connect(
            servers=self._servers,
            name=self._name,
            connect_timeout=max(1, int(self._connect_timeout)),
            reconnected_cb=reconnected,
            disconnected_cb=disconnected,
            error_cb=error_cb,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            allow_reconnect=True,
            **self._options,
        )

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            if not self._nc.is_closed:
                await self._nc.close()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        try:  # the hot path: no context manager, no message built unless it fails
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except NATS_ERRORS as exc:
            raise mesh_error(exc, f"publish to {subject}", subject=subject) from exc

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        with map_nats_errors(f"subscribe to {subject}", subject=subject):
            sub = await self.nc.subscribe(
                subject,
                queue=queue,
                cb=handler,
                pending_msgs_limit=65536,
                pending_bytes_limit=256 * 1024 * 1024,
            )
        return sub

    def new_inbox(self) -> str:
        return self.nc.new_inbox()

    async def flush(self, timeout: float = 5.0) -> None:
        """Return once the server has processed everything sent before: subscriptions
        included, so another connection's publish after this reaches them.

        nats-py 2.16 writes a flush's PING to the socket at once but queues SUB, UNSUB and PUB
        for its flusher task, so the PONG can come back before a subscription made just before
        it is registered (measured: 1 publish in 300 from another connection lost). So the
        queue is written out first (``_flush_pending(force_flush=True)`` waits for the
        flusher), then the PING follows it.
        """
        with map_nats_errors("flush"):
            await self.nc._flush_pending(force_flush=True)
            await self.nc.flush(timeout=max(1, int(timeout)))

    def replicas(self, asked: int | None) -> int:
        """The replica count to create stores with: ``asked``, or 3 when the server we are
        connected to is in a cluster of three or more servers (its INFO lists their client
        URLs), else 1; never more than the servers known."""
        if asked is not None:
            return asked
        info = self.nc._server_info  # nats-py keeps the server's INFO here
        servers = len(info.get("connect_urls") or ()) if info.get("cluster") else 1
        return 3 if servers >= 3 else 1

    async def key_value(
        self,
        bucket: str,
        *,
        ttl: float | None = None,
        replicas: int | None = None,
        history: int = 1,
    ) -> KeyValueBucket:
        kv = self._kvs.get(bucket)
        if kv is not None:
            return kv
        js = self.nc.jetstream(timeout=5.0)
        want = self.replicas(replicas)
        with map_nats_errors(
            f"opening the JetStream key-value bucket {bucket!r}",
            jetstream_off_at=self._jetstream_off_at(),
        ):
            try:
                raw = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                raw = await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=history, ttl=ttl, replicas=want)
                )
            await self._ensure_limits(js, f"KV_{bucket}", want)
        kv = self._kvs[bucket] = _NatsKV(raw)
        return kv

    async def _ensure_limits(self, js: JetStreamContext, stream: str, want: int) -> None:
        """Scale a stream up to ``want`` replicas (never down: another process may have created
        it with fewer, an R1 default or a command run during a registry start), and let it
        have ``MAX_WATCHERS`` consumers (every mesh process watches the head and policy
        stores, so the server's default of 1,000 per stream would stop the 1,001st)."""
        info = await js.stream_info(stream)
        config = info.config
        have = config.num_replicas or 1
        watchers = config.max_consumers or 0
        if have >= want and watchers >= MAX_WATCHERS:
            return
        try:
            await js.update_stream(
                replace(config, num_replicas=max(have, want), max_consumers=MAX_WATCHERS)
            )
        except nats.errors.Error as exc:
            log.warning(
                "mesh.store_limits_unchanged",
                store=stream,
                replicas=have,
                wanted=want,
                max_consumers=watchers,
                error=str(exc) or type(exc).__name__,
            )
        else:
            if have < want:
                log.warning("mesh.store_replicas_raised", store=stream, replicas=want, were=have)

    def forget_bucket(self, bucket: str) -> None:
        self._kvs.pop(bucket, None)

    async def bucket_id(self, bucket: str) -> str | None:
        return await self.stream_id(f"KV_{bucket}")

    async def stream_id(self, name: str) -> str | None:
        js = self.nc.jetstream(timeout=5.0)
        with map_nats_errors(f"looking up the JetStream stream {name!r}"):
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                return None
        return str(info.created)

    async def stream(self, name: str, subject: str, *, replicas: int | None = None) -> Stream:
        js = self.nc.jetstream(timeout=5.0)
        want = self.replicas(replicas)
        with map_nats_errors(
            f"opening the JetStream stream {name!r}", jetstream_off_at=self._jetstream_off_at()
        ):
            try:
                await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await js.add_stream(StreamConfig(name=name, subjects=[subject], num_replicas=want))
            await self._ensure_limits(js, name, want)
        return _NatsStream(js, name, subject)

    def _jetstream_off_at(self) -> str | None:
        """The connected server's URL if its INFO says JetStream is not enabled there."""
        nc = self.nc
        if nc._server_info.get("jetstream"):  # nats-py keeps the server's INFO here
            return None
        url = nc.connected_url
        return _shown(url.geturl()) if url is not None else ", ".join(map(_shown, self._servers))

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._reconnect_callbacks.append(callback)

    def on_disconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._disconnect_callbacks.append(callback)
