"""The directory: signed instance records in a JetStream KV bucket, and a verified local view.

Each serving instance writes ``<agent>.<instance>`` -> signed record, refreshed every heartbeat,
and publishes a signed beat on core NATS at the same pace. Callers watch the bucket, verify
every record (certificate against the trust root, signature against the certificate) and every
beat (against the certificate of the record held), and treat an instance with neither for the
TTL as dead. A forged, malformed, stale or replayed record or beat is dropped and counted.

The view survives a broken watch: records are kept while it is re-created, beats keep their
instances alive meanwhile, a watch that falls silent while beats still arrive is re-created,
and time spent disconnected from NATS (when nothing can be heard) is not held against anyone.

A caller learns only about the agents it calls: each agent gets its own subject-filtered watch
(``<agent>.*``) and beat subscription (``<p>.beat.<agent>.*``), opened on first use, so a mesh of
N agents costs each of them what its callees send, not what all N send. Tools that list the
whole mesh (the registry's graph, ``mesh-policy``, the dashboard) call ``watch_all``: one watch
over the bucket and one subscription to every beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

from mesh._core.beats import decode_beat
from mesh._core.config import Timeouts
from mesh._core.identity import CertificateVerifier
from mesh._core.names import beat_listen_subject
from mesh._core.records import STATE_SERVING, InstanceRecord, decode_record
from mesh._log import get_logger
from mesh._runtime.concurrency import cancel_and_wait
from mesh._transport.base import Handler, InboundMessage, KeyValueBucket, Subscription, Transport
from mesh.errors import DecodeError, MeshError, Unauthenticated, Unavailable

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

    def __init__(
        self, transport: Transport, name: str, *, ttl: float, replicas: int | None
    ) -> None:
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

    async def watch(self, keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
        """A watch over the keys ``keys`` matches in the current bucket (see
        ``KeyValueBucket.watch``)."""
        kv = await self.open()
        async for item in kv.watch(keys):
            yield item


Clock = Callable[[], float]
Watcher = Callable[[str], AsyncIterator[tuple[str, bytes | None] | None]]
Listener = Callable[[str, Handler], Awaitable[Subscription]]


class _Watch:
    """One watch over the bucket: every key (``agent`` None) or one agent's, with its beats."""

    __slots__ = ("agent", "beats", "generation", "heard", "ready", "task")

    def __init__(self, agent: str | None) -> None:
        self.agent = agent
        self.ready = asyncio.Event()  # the records present when it began are applied
        self.heard = time.monotonic()  # when it last yielded anything
        self.generation = 0  # the bucket generation it runs over
        self.task: asyncio.Task[None] | None = None
        self.beats: Subscription | None = None

    @property
    def keys(self) -> str:
        return ">" if self.agent is None else f"{self.agent}.*"


_MAX_SKEW = Timeouts().max_future


class Directory:
    """A caller's verified, live view of the directory bucket.

    Liveness comes from the record's signed timestamp, capped by its arrival: a record counts
    as heard at ``min(arrival, ts + max_skew)``, so a writer within the allowed skew is judged
    by arrival (as if clocks agreed), and a copy of an old record re-put by someone holding the
    broker is worth no more than its signature time says. A record older than
    ``ttl + max_skew`` by its ``ts``, dated more than ``max_skew`` ahead, or not newer than
    the last one accepted for its key (remembered after the instance is forgotten, for as long
    as such a record could still pass the age check) is dropped and counted in ``refused``.
    Deleting a key, which needs no signature, hides an instance from new calls but is no
    evidence that it is gone: ``is_gone`` trusts only a signed ``draining`` record or the
    absence of signed heartbeats for ``ttl``.

    Signed beats (``on_beat``) raise the liveness of an instance whose record is held, under
    the same rules (future, age, a floor of their own). While the transport is disconnected
    (``deaf``) liveness is judged as of the moment it was lost; on ``hear`` the instances alive
    then get the time spent deaf back, so nobody is swept for the broker's outage.

    Nothing is watched until asked: ``instances``, ``get``, ``is_gone`` and ``wait_for`` open
    the watch of the agent they name (``watch_agent`` also waits until it has loaded), and
    ``watch_all`` watches every agent; ``all`` lists what the watches hold.

    Args:
        open_watch: returns a fresh watch over the keys a pattern matches (``>`` for every
            key, ``<agent>.*`` for one agent's); re-created after reconnects.
        verifier: checks certificates.
        ttl: an instance not heard from for this long is dead.
        on_dead: called with the last record of an instance found dead (no heartbeat).
        clock: unix seconds.
        max_skew: how far the writers' clocks may be from this one, in seconds
            (``Timeouts.max_future``).
        bucket: the bucket watched: when the watch has been quiet for ``ttl / 3`` the bucket
            is checked, and re-created and watched afresh if someone deleted it. The records
            already known are kept meanwhile.
        max_floors: how many instances' last timestamps are remembered; past it the oldest
            is folded into one floor for every instance.
        on_heard: called with ``(key, ts)`` for every record or beat accepted (fresh signed
            evidence of life, e.g. to lift a "no responders" penalty).
        on_reconnected: called with the record of an instance whose beat says its connection
            was re-established (its epoch changed): what was sent to it before may be lost.
        prefix: the mesh's subject prefix: a beat signed for another mesh is refused.
        listen: subscribes a handler to a subject: the beats of each agent watched (or of
            all, for ``watch_all``) are listened to through it. ``None``: none are (beats
            may still be given to ``accept_beat``).
    """

    def __init__(
        self,
        open_watch: Watcher,
        verifier: CertificateVerifier,
        *,
        ttl: float,
        on_dead: Callable[[InstanceRecord], None] | None = None,
        clock: Clock = time.time,
        max_skew: float = _MAX_SKEW,
        bucket: DirectoryBucket | None = None,
        max_floors: int = 65_536,
        on_heard: Callable[[str, float], None] | None = None,
        on_reconnected: Callable[[InstanceRecord], None] | None = None,
        prefix: str = "mesh",
        listen: Listener | None = None,
    ) -> None:
        self._prefix = prefix
        self._open_watch = open_watch
        self._listen = listen
        self._bucket = bucket
        self._all: _Watch | None = None  # the watch over every key, once ``watch_all``
        self._watches: dict[str, _Watch] = {}  # the agents watched one by one
        self._loaded: set[str] = set()  # agents whose records are loaded ("*": every agent)
        # When a beat was last accepted (monotonic), per agent and under None for any.
        self._beat_heard: dict[str | None, float] = {}
        self._on_heard = on_heard
        self._on_reconnected = on_reconnected
        self._beat_floors: dict[str, float] = {}  # the ts of the last beat accepted per key
        self._ups: dict[str, int] = {}  # the connection epoch of the last beat per key
        self._deaf_since: float | None = None
        self.watch_restarts: Counter[str] = Counter()  # re-created watches, by cause
        self._verifier = verifier
        self._ttl = ttl
        self._on_dead = on_dead
        self._clock = clock
        self._live = clock  # liveness is judged by this clock: frozen while deaf
        self._max_skew = max_skew
        self._last: dict[str, InstanceRecord] = {}  # last signed record of every known instance
        self._seen: dict[str, float] = {}  # when it was last heard from (capped by its ts)
        # The signed ts of the last record accepted per key, least recently raised first; kept
        # after the instance is forgotten, until the age check alone refuses anything older.
        self._floors: dict[str, float] = {}
        self._floor_all = 0.0  # raised only when more than ``max_floors`` keys are remembered
        self._max_floors = max(1, max_floors)
        self.refused: Counter[str] = Counter()  # records dropped, by reason
        self._listed: dict[str, InstanceRecord] = {}  # those whose key is not deleted
        self._by_agent: dict[str, list[InstanceRecord]] = {}
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the sweep and the guard of the watches (none is opened yet)."""
        self._sweeper = asyncio.create_task(self._sweep(), name="mesh-directory-sweep")
        self._guard = asyncio.create_task(self._guard_watch(), name="mesh-directory-guard")

    def loaded(self, agent: str) -> bool:
        """Whether the records of ``agent`` are loaded (its watch, or ``watch_all``'s, has
        delivered the records present when it began)."""
        return agent in self._loaded or "*" in self._loaded

    async def watch_agent(self, agent: str, timeout: float) -> None:
        """Watch ``agent`` (if nothing watches it yet) and wait until its records are loaded.

        Raises:
            Unavailable: they did not load within ``timeout``.
        """
        await self._wait_ready(self._watch_of(agent), timeout)

    async def watch_all(self, timeout: float) -> None:
        """Watch every agent (the registry, admin tools), and wait until all are loaded; the
        watches of single agents are then closed (the records they loaded are kept).

        Raises:
            Unavailable: the bucket could not be read within ``timeout``.
        """
        if self._all is None:
            self._all = self._begin(None)
        await self._wait_ready(self._all, timeout)
        watches, self._watches = list(self._watches.values()), {}
        await self._stop(watches)

    async def _wait_ready(self, watch: _Watch, timeout: float) -> None:
        if watch.ready.is_set():
            return
        try:
            await asyncio.wait_for(watch.ready.wait(), timeout)
        except TimeoutError:
            what = "the directory" if watch.agent is None else f"{watch.agent!r} in the directory"
            raise Unavailable(f"{what} did not load in time (is JetStream enabled?)") from None

    def _watch_of(self, agent: str) -> _Watch:
        watch = self._all or self._watches.get(agent)
        if watch is None:
            watch = self._watches[agent] = self._begin(agent)
        return watch

    def _begin(self, agent: str | None) -> _Watch:
        watch = _Watch(agent)
        name = "mesh-directory-watch" if agent is None else f"mesh-directory-watch-{agent}"
        watch.task = asyncio.create_task(self._run(watch), name=name)
        return watch

    def _watching(self) -> list[_Watch]:
        return [self._all] if self._all is not None else list(self._watches.values())

    def restart_watch(self, cause: str = "reconnect") -> None:
        """Re-create every watch (after a reconnect: the old consumers may be gone). The
        records held are kept: the new watches deliver them again, ignored as already held.
        """
        for watch in self._watching():
            self._restart(watch, cause)

    def _restart(self, watch: _Watch, cause: str) -> None:
        self.watch_restarts[cause] += 1
        if watch.task is not None:
            watch.task.cancel()
        watch.heard = time.monotonic()
        watch.task = asyncio.create_task(self._run(watch), name="mesh-directory-watch")

    async def close(self) -> None:
        watches = self._watching()
        self._all, self._watches = None, {}
        await cancel_and_wait((self._sweeper, self._guard))
        await self._stop(watches)

    @staticmethod
    async def _stop(watches: list[_Watch]) -> None:
        await cancel_and_wait(tuple(w.task for w in watches))
        for watch in watches:
            if watch.beats is not None:
                with contextlib.suppress(Exception):
                    await watch.beats.unsubscribe()

    def deaf(self) -> None:
        """The transport lost its connection: nothing can be heard until ``hear``, so
        liveness is judged as of now until then (no instance is swept for the outage)."""
        if self._deaf_since is None:
            since = self._deaf_since = self._clock()
            self._live = lambda: since

    def hear(self) -> None:
        """The connection is back: the instances alive when it was lost get the time spent
        deaf added to their last evidence (never past now), then the clock runs again.

        A broker that cuts the connection can thus keep a dead instance listed for at most
        ``ttl`` after each reconnect; it could as well drop every message sent to it.
        """
        since = self._deaf_since
        if since is None:
            return
        self._deaf_since = None
        now = self._clock()
        credit, horizon = max(0.0, now - since), since - self._ttl
        seen = self._seen
        for key, heard in seen.items():
            if heard >= horizon:
                seen[key] = min(heard + credit, now)
        self._live = self._clock

    async def _guard_watch(self) -> None:
        """Re-create the watch when it has been silent for ``ttl / 3``, checked every
        ``ttl / 6``: at once if beats still arrive meanwhile (every serving instance also puts
        its record every heartbeat, so a working watch cannot be silent then), and if the
        bucket was deleted or replaced (a deleted bucket ends no watch: it falls silent). The
        beats are looked at first: asking JetStream about the bucket can take its whole
        timeout while a stream leader is being elected."""
        quiet = self._ttl / 3
        while True:
            await asyncio.sleep(quiet / 2)
            now = time.monotonic()
            if self._deaf_since is not None:
                continue  # a reconnect restarts the watches anyway
            silent = [w for w in self._watching() if now - w.heard >= quiet]
            if not silent:
                continue
            for watch in silent:
                if now - self._beat_heard.get(watch.agent, 0.0) < quiet:
                    log.info(
                        "mesh.directory_watch_stalled",
                        agent=watch.agent or "*",
                        silent_s=round(now - watch.heard, 2),
                    )
                    self._restart(watch, "stalled")
                else:
                    watch.heard = now  # nobody beats: a quiet watch may be a quiet agent
            if self._bucket is not None:
                try:
                    await self._bucket.recover()
                except MeshError:
                    continue  # JetStream unreachable: the watches retry on their own
                for watch in self._watching():
                    if self._bucket.generation != watch.generation:  # replaced, by anyone
                        self._restart(watch, "bucket")

    async def _run(self, watch: _Watch) -> None:
        bucket = self._bucket
        while True:
            generation = watch.generation = bucket.generation if bucket is not None else 0
            try:
                if watch.beats is None and self._listen is not None:
                    subject = beat_listen_subject(self._prefix, watch.agent or "*")
                    watch.beats = await self._listen(subject, self.on_beat)
                async for item in self._open_watch(watch.keys):
                    watch.heard = time.monotonic()
                    if bucket is not None and bucket.generation != generation:
                        break  # the bucket was re-created: watch the new one
                    if item is None:
                        if not watch.ready.is_set():
                            watch.ready.set()
                            self._loaded.add(watch.agent or "*")
                            self._changed.set()
                            self._changed = asyncio.Event()
                        continue
                    self._apply(*item)
            except asyncio.CancelledError:
                raise
            except MeshError:
                pass  # transport unavailable; try again below
            except Exception as exc:  # the watch must outlive anything the client raises
                log.warning("mesh.directory_watch_failed", error_type=type(exc).__name__)
            await asyncio.sleep(0.5)

    def _apply(self, key: str, raw: bytes | None) -> None:
        if raw is None:
            if self._listed.pop(key, None) is not None:
                self._reindex(key.partition(".")[0])
            return
        try:
            record = decode_record(raw, self._verifier)
        except Exception:  # a poisoned entry must never stop the watch
            self.refused["invalid"] += 1
            return
        now, ts, skew = self._clock(), record.ts, self._max_skew
        if record.key != key:
            self.refused["misfiled"] += 1  # copied under another instance's key
            return
        if ts > now + skew:
            self.refused["future"] += 1
            return
        if ts + self._ttl + skew < now:
            self.refused["stale"] += 1  # dead by its own signature time, whoever re-put it
            return
        if ts <= self._floors.get(key, self._floor_all):
            old = self._last.get(key)
            if old is None or ts < old.ts:  # not the record held, delivered again by a watch
                self.refused["replayed"] += 1
            return  # an older (or the same) record: no evidence of life
        self._last[key] = record
        # Heard now, unless its signature is older than the skew allows: then no later than
        # its signature time says (a record held back and re-put is no fresher than that).
        self._seen[key] = min(now, ts + skew)
        self._raise_floor(key, ts, now)
        self._listed[key] = record
        self._reindex(record.agent)
        if self._on_heard is not None:
            self._on_heard(key, ts)

    async def on_beat(self, msg: InboundMessage) -> None:
        """A signed beat arrived (subscription handler; ``accept_beat`` does the work)."""
        self.accept_beat(msg.data)

    def accept_beat(self, raw: bytes) -> bool:
        """Take a beat as evidence of life if it verifies with the certificate of the record
        held for its instance and is newer than the last beat accepted for it; return whether
        it was taken. A beat of an instance with no record held is ignored: it cannot be
        verified, and a beat carries nothing to call the instance with."""
        try:
            beat = decode_beat(raw)
        except DecodeError:
            self.refused["beat_invalid"] += 1
            return False
        if beat.prefix != self._prefix:
            self.refused["beat_misfiled"] += 1  # copied from another mesh on the same broker
            return False
        key = beat.key
        record = self._last.get(key)
        if record is None:
            return False
        if beat.up == self._ups.get(key) and self._live() - self._seen[key] < self._ttl / 3:
            return False  # heard from moments ago, same epoch: no news, no signature to check
        now, ts, skew = self._clock(), beat.ts, self._max_skew
        if ts > now + skew:
            self.refused["beat_future"] += 1
            return False
        if ts + self._ttl + skew < now:
            self.refused["beat_stale"] += 1
            return False
        if ts <= self._beat_floors.get(key, 0.0):
            self.refused["beat_replayed"] += 1
            return False
        if ts <= self._floors.get(key, self._floor_all):
            return False  # older than the record held (sent just before it): nothing new
        cert = record.certificate
        if cert.serial in self._verifier.revoked or cert.not_after < now:
            self.refused["beat_revoked"] += 1
            return False
        try:
            beat.verify(cert.sign_pk)
        except Unauthenticated:
            self.refused["beat_forged"] += 1
            return False
        self._beat_floors[key] = ts
        heard = min(now, ts + skew)
        if heard > self._seen[key]:
            self._seen[key] = heard
        self._beat_heard[beat.agent] = self._beat_heard[None] = time.monotonic()
        old = self._ups.get(key)
        self._ups[key] = beat.up
        if old is not None and old != beat.up and self._on_reconnected is not None:
            self._on_reconnected(record)
        if self._on_heard is not None:
            self._on_heard(key, ts)
        return True

    def _raise_floor(self, key: str, ts: float, now: float) -> None:
        floors = self._floors
        floors.pop(key, None)
        floors[key] = ts
        if len(floors) > self._max_floors:
            self._prune_floors(now)
            while len(floors) > self._max_floors:
                oldest = next(iter(floors))
                self._floor_all = max(self._floor_all, floors.pop(oldest))

    def _prune_floors(self, now: float) -> None:
        """Forget the floors the age check covers: any record not newer is refused as stale."""
        horizon = now - self._ttl - self._max_skew
        for key in [k for k, ts in self._floors.items() if ts < horizon]:
            del self._floors[key]
        beats = self._beat_floors
        for key in [k for k, ts in beats.items() if ts < horizon]:
            del beats[key]

    def _reindex(self, agent: str) -> None:
        self._by_agent[agent] = [r for r in self._listed.values() if r.agent == agent]
        self._changed.set()
        self._changed = asyncio.Event()

    def _sweep_once(self) -> None:
        self._prune_floors(self._clock())
        now = self._live()
        for key, seen in list(self._seen.items()):
            if seen + self._ttl < now:
                record = self._last.pop(key)
                del self._seen[key]
                self._ups.pop(key, None)
                self._listed.pop(key, None)
                self._reindex(record.agent)
                if self._on_dead is not None and record.state == STATE_SERVING:
                    self._on_dead(record)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 4)
            self._sweep_once()

    def get(self, key: str) -> InstanceRecord | None:
        """The listed record of an instance, if any (its agent is watched from now on)."""
        self._watch_of(key.partition(".")[0])
        return self._listed.get(key)

    def is_gone(self, key: str) -> bool:
        """Signed evidence that the instance will not answer: it announced draining, or no
        signed heartbeat arrived for ``ttl``. (An instance of an agent not loaded yet counts
        as gone: ask once ``loaded`` says so.)"""
        self._watch_of(key.partition(".")[0])
        record = self._last.get(key)
        if record is None or record.state != STATE_SERVING:
            return True
        return self._seen[key] + self._ttl < self._live()

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
        """Live, serving instances of ``agent`` (watched from now on, if it was not yet)."""
        if self._all is None and agent not in self._watches:
            self._watch_of(agent)
        now = self._live()
        out = []
        for r in self._by_agent.get(agent, ()):
            key = r.key
            if r.state != STATE_SERVING or self._seen[key] + self._ttl < now:
                continue
            out.append(r)
        return out

    def all(self) -> list[InstanceRecord]:
        """Every listed record (live or not yet swept) of the agents watched: of every agent
        after ``watch_all``."""
        return list(self._listed.values())

    async def wait_for(self, agent: str, timeout: float) -> InstanceRecord:
        """Wait until ``agent`` has a live instance.

        Raises:
            Unavailable: none appeared within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self._watch_of(agent)
        while True:
            found = self.instances(agent)
            if found:
                return found[0]
            left = end - loop.time()
            if left <= 0:
                raise Unavailable(f"no live instance of agent {agent!r} in the directory")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
