"""The directory: signed instance records in a JetStream KV bucket, and a verified local view.

Each serving instance writes ``<agent>.<instance>`` -> signed record, refreshed every heartbeat.
Callers watch the bucket, verify every record (certificate against the trust root, signature
against the certificate), and treat a record whose heartbeat is older than the TTL as a dead
instance. A forged or malformed record is dropped and counted, never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from mesh._core.identity import CertificateVerifier
from mesh._core.records import STATE_SERVING, InstanceRecord, decode_record
from mesh._log import get_logger
from mesh._runtime.concurrency import cancel_and_wait
from mesh._transport.base import KeyValueBucket, Transport
from mesh.errors import MeshError, Unavailable

__all__ = ["Directory", "DirectoryBucket"]

log = get_logger(__name__)


class DirectoryBucket:
    """The directory bucket, re-created when someone deletes it.

    The broker is not trusted: anyone with JetStream rights can delete the bucket. Writers
    (``Registration``) and the watch (``Directory``) then call ``recover``, which re-creates an
    empty bucket with the same settings; every instance re-announces itself at its next
    heartbeat. The records are signed, so a re-created bucket is no more trusted than the old.

    Args:
        transport: the broker connection.
        name: the bucket (``<prefix>-directory``).
        ttl: the bucket's entry TTL.
        replicas: its replicas.
    """

    def __init__(self, transport: Transport, name: str, *, ttl: float, replicas: int) -> None:
        self._transport = transport
        self.name = name
        self._ttl = ttl
        self._replicas = replicas
        self.kv: KeyValueBucket | None = None
        self.generation = 0  # bumped each time the bucket object is replaced
        self._id: str | None = None  # the incarnation opened (``Transport.bucket_id``)
        self._lock = asyncio.Lock()

    async def open(self) -> KeyValueBucket:
        """The bucket, created if missing.

        Raises:
            Unavailable: JetStream could not be reached.
        """
        if self.kv is None:
            kv = await self._transport.key_value(self.name, ttl=self._ttl, replicas=self._replicas)
            self._id = await self._transport.bucket_id(self.name)
            self.kv = kv
        return self.kv

    async def recover(self) -> bool:
        """If the bucket was deleted, re-create it; if another process already re-created it,
        open the new one. Return whether the bucket object changed (``generation`` bumped).

        Raises:
            Unavailable: JetStream could not be reached.
        """
        async with self._lock:
            found = await self._transport.bucket_id(self.name)
            if found is not None and found == self._id:
                return False
            self._transport.forget_bucket(self.name)
            self.kv = None
            await self.open()
            self.generation += 1
            if found is None:
                log.warning("mesh.directory_recreated", bucket=self.name)
            return True

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None] | None]:
        """A watch over the current bucket (see ``KeyValueBucket.watch``)."""
        kv = await self.open()
        async for item in kv.watch():
            yield item


Clock = Callable[[], float]


class Directory:
    """A caller's verified, live view of the directory bucket.

    Liveness is judged by when this process last received a signed record of an instance, not
    by the writer's clock (records loaded when the watch starts are judged by their signed
    timestamp, once). Deleting a key, which needs no signature, hides an instance from new
    calls but is no evidence that it is gone: ``is_gone`` trusts only a signed ``draining``
    record or the absence of signed heartbeats for ``ttl``.

    Args:
        open_watch: returns a fresh watch over the bucket (re-created after reconnects).
        verifier: checks certificates.
        ttl: an instance not heard from for this long is dead.
        on_dead: called with the last record of an instance found dead (no heartbeat).
        clock: unix seconds.
        bucket: the bucket watched: when the watch has been quiet for ``ttl / 3`` the bucket
            is checked, and re-created and watched afresh if someone deleted it. The records
            already known are kept meanwhile.
    """

    def __init__(
        self,
        open_watch: Callable[[], AsyncIterator[tuple[str, bytes | None] | None]],
        verifier: CertificateVerifier,
        *,
        ttl: float,
        on_dead: Callable[[InstanceRecord], None] | None = None,
        clock: Clock = time.time,
        max_skew: float = 60.0,
        bucket: DirectoryBucket | None = None,
    ) -> None:
        self._open_watch = open_watch
        self._bucket = bucket
        self._heard = time.monotonic()  # when the watch last yielded anything
        self._watched = 0  # the bucket generation the watch runs over
        self._verifier = verifier
        self._ttl = ttl
        self._on_dead = on_dead
        self._clock = clock
        self._max_skew = max_skew
        self._last: dict[str, InstanceRecord] = {}  # last signed record of every known instance
        self._seen: dict[str, float] = {}  # when it was last heard from
        self._listed: dict[str, InstanceRecord] = {}  # those whose key is not deleted
        self._by_agent: dict[str, list[InstanceRecord]] = {}
        self._ejected: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        """Start watching; return once the initial records are loaded.

        Raises:
            Unavailable: the bucket could not be read within ``timeout``.
        """
        self._task = asyncio.create_task(self._run(), name="mesh-directory-watch")
        self._sweeper = asyncio.create_task(self._sweep(), name="mesh-directory-sweep")
        if self._bucket is not None:
            self._guard = asyncio.create_task(self._guard_bucket(), name="mesh-directory-guard")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise Unavailable("directory did not load in time (is JetStream enabled?)") from None

    def restart_watch(self) -> None:
        """Re-create the watch (after a reconnect: the old consumer may be gone)."""
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(self._run(), name="mesh-directory-watch")

    async def close(self) -> None:
        await cancel_and_wait((self._task, self._sweeper, self._guard))

    async def _guard_bucket(self) -> None:
        """Re-create the bucket and the watch if the bucket was deleted (a deleted bucket
        ends no watch: it just falls silent)."""
        assert self._bucket is not None
        quiet = self._ttl / 3
        while True:
            await asyncio.sleep(quiet)
            if time.monotonic() - self._heard < quiet:
                continue
            try:
                await self._bucket.recover()
            except MeshError:
                continue  # JetStream unreachable: the reconnect restarts the watch
            if self._bucket.generation != self._watched:  # replaced, by us or by a writer
                self.restart_watch()
            self._heard = time.monotonic()

    async def _run(self) -> None:
        bucket = self._bucket
        while True:
            loading = True
            generation = self._watched = bucket.generation if bucket is not None else 0
            try:
                async for item in self._open_watch():
                    self._heard = time.monotonic()
                    if bucket is not None and bucket.generation != generation:
                        break  # the bucket was re-created: watch the new one
                    if item is None:
                        loading = False
                        self._ready.set()
                        continue
                    self._apply(*item, loading=loading)
            except asyncio.CancelledError:
                raise
            except MeshError:
                pass  # transport unavailable; try again below
            await asyncio.sleep(0.5)

    def _apply(self, key: str, raw: bytes | None, *, loading: bool = False) -> None:
        if raw is None:
            if self._listed.pop(key, None) is not None:
                self._reindex(key.partition(".")[0])
            return
        try:
            record = decode_record(raw, self._verifier)
        except Exception:  # a poisoned entry must never stop the watch
            return
        now = self._clock()
        if record.key != key or record.ts > now + self._max_skew:
            return  # copied under another instance's key, or dated in the future
        old = self._last.get(key)
        if old is not None and old.ts >= record.ts:
            return  # an older (or the same) record replayed: no evidence of life
        self._last[key] = record
        # A record that was already in the bucket is as fresh as its signed timestamp says;
        # one that arrives live was just written.
        self._seen[key] = min(now, record.ts) if loading and record.ts < now - self._ttl else now
        self._listed[key] = record
        self._reindex(record.agent)

    def _reindex(self, agent: str) -> None:
        self._by_agent[agent] = [r for r in self._listed.values() if r.agent == agent]
        self._changed.set()
        self._changed = asyncio.Event()

    def _sweep_once(self) -> None:
        now = self._clock()
        for key, seen in list(self._seen.items()):
            if seen + self._ttl < now:
                record = self._last.pop(key)
                del self._seen[key]
                self._listed.pop(key, None)
                self._reindex(record.agent)
                if self._on_dead is not None and record.state == STATE_SERVING:
                    self._on_dead(record)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 4)
            self._sweep_once()

    def eject(self, key: str, seconds: float) -> None:
        """Stop picking an instance for new calls for ``seconds``."""
        self._ejected[key] = self._clock() + seconds

    def get(self, key: str) -> InstanceRecord | None:
        """The listed record of an instance, if any."""
        return self._listed.get(key)

    def is_gone(self, key: str) -> bool:
        """Signed evidence that the instance will not answer: it announced draining, or no
        signed heartbeat arrived for ``ttl``."""
        record = self._last.get(key)
        if record is None or record.state != STATE_SERVING:
            return True
        return self._seen[key] + self._ttl < self._clock()

    async def wait_gone(self, key: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``is_gone(key)``; return whether it became true."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.is_gone(key):
            left = end - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, self._ttl / 4))
        return True

    def instances(self, agent: str) -> list[InstanceRecord]:
        """Live, serving, not ejected instances of ``agent``."""
        now = self._clock()
        out = []
        for r in self._by_agent.get(agent, ()):
            key = r.key
            if r.state != STATE_SERVING or self._seen[key] + self._ttl < now:
                continue
            until = self._ejected.get(key)
            if until is not None:
                if until > now:
                    continue
                del self._ejected[key]
            out.append(r)
        return out

    def all(self) -> list[InstanceRecord]:
        """Every listed record (live or not yet swept)."""
        return list(self._listed.values())

    async def wait_for(self, agent: str, timeout: float) -> InstanceRecord:
        """Wait until ``agent`` has a live instance.

        Raises:
            Unavailable: none appeared within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            found = self.instances(agent)
            if found:
                return found[0]
            left = end - loop.time()
            if left <= 0:
                raise Unavailable(f"no live instance of agent {agent!r} in the directory")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
