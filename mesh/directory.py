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
from dataclasses import dataclass, field
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import DecodeError, MeshError, Unauthenticated, Unavailable
from .identity import Certificate, CertificateVerifier

__all__ = ["Directory", "EndpointInfo", "InstanceRecord", "decode_record", "encode_record"]

Clock = Callable[[], float]
STATE_SERVING = "serving"
STATE_DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What callers need to know about an endpoint before calling it."""

    name: str
    idempotent: bool = False


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A verified directory record."""

    certificate: Certificate
    endpoints: dict[str, EndpointInfo]
    version: str
    labels: dict[str, str]
    ts: float
    state: str = STATE_SERVING
    policy_revision: int | None = None
    topics: tuple[str, ...] = field(default=())

    @property
    def agent(self) -> str:
        return self.certificate.agent

    @property
    def instance(self) -> str:
        return self.certificate.instance

    @property
    def key(self) -> str:
        return f"{self.agent}.{self.instance}"


def encode_record(
    signing: SigningKey,
    cert: Certificate,
    *,
    endpoints: list[EndpointInfo],
    version: str,
    labels: dict[str, str],
    ts: float,
    state: str = STATE_SERVING,
    policy_revision: int | None = None,
    topics: tuple[str, ...] = (),
) -> bytes:
    """Sign a record with the instance's key: ``msgpack([body, signature])``."""
    body: dict[str, Any] = {
        "cert": cert.raw,
        "endpoints": [{"name": e.name, "idempotent": e.idempotent} for e in endpoints],
        "version": version,
        "labels": labels,
        "ts": int(ts * 1000),
        "state": state,
        "topics": list(topics),
    }
    if policy_revision is not None:
        body["policy_revision"] = policy_revision
    packed = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb([packed, signing.sign(packed).signature], use_bin_type=True)


def decode_record(raw: bytes, verifier: CertificateVerifier) -> InstanceRecord:
    """Verify and parse a record.

    Raises:
        DecodeError: malformed bytes.
        Unauthenticated: bad certificate or bad signature.
    """
    try:
        outer = msgpack.unpackb(raw, raw=False)
        body_raw, sig = outer
        body = msgpack.unpackb(body_raw, raw=False)
        cert_raw = body["cert"]
        endpoints = {
            e["name"]: EndpointInfo(str(e["name"]), bool(e.get("idempotent", False)))
            for e in body["endpoints"]
        }
        version = str(body["version"])
        labels = {str(k): str(v) for k, v in dict(body.get("labels") or {}).items()}
        ts = int(body["ts"]) / 1000.0
        state = str(body.get("state", STATE_SERVING))
        rev = body.get("policy_revision")
        topics = tuple(str(t) for t in body.get("topics", ()))
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as exc:
        raise DecodeError(f"malformed directory record ({type(exc).__name__})") from None
    if not isinstance(cert_raw, bytes) or not isinstance(sig, bytes):
        raise DecodeError("malformed directory record (binary fields)")
    cert = verifier.verify(cert_raw)
    try:
        VerifyKey(cert.sign_pk).verify(body_raw, sig)
    except BadSignatureError:
        raise Unauthenticated(
            f"directory record of {cert.agent}.{cert.instance} is forged"
        ) from None
    return InstanceRecord(
        certificate=cert,
        endpoints=endpoints,
        version=version,
        labels=labels,
        ts=ts,
        state=state,
        policy_revision=int(rev) if isinstance(rev, int) else None,
        topics=topics,
    )


class Directory:
    """A caller's verified, live view of the directory bucket.

    Args:
        open_watch: returns a fresh watch over the bucket (re-created after reconnects).
        verifier: checks certificates.
        ttl: a record older than this is a dead instance.
        on_dead: called with a record when its instance is found dead (expired heartbeat).
        clock: unix seconds.
    """

    def __init__(
        self,
        open_watch: Callable[[], AsyncIterator[tuple[str, bytes | None] | None]],
        verifier: CertificateVerifier,
        *,
        ttl: float,
        on_dead: Callable[[InstanceRecord], None] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._open_watch = open_watch
        self._verifier = verifier
        self._ttl = ttl
        self._on_dead = on_dead
        self._clock = clock
        self._records: dict[str, InstanceRecord] = {}
        self._by_agent: dict[str, list[InstanceRecord]] = {}
        self._ejected: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.rejected = 0

    async def start(self, timeout: float) -> None:
        """Start watching; return once the initial records are loaded."""
        self._task = asyncio.create_task(self._run(), name="mesh-directory-watch")
        self._sweeper = asyncio.create_task(self._sweep(), name="mesh-directory-sweep")
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
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        while True:
            try:
                async for item in self._open_watch():
                    if item is None:
                        self._ready.set()
                        continue
                    self._apply(*item)
            except asyncio.CancelledError:
                raise
            except MeshError:
                pass  # transport unavailable; try again below
            await asyncio.sleep(0.5)

    def _apply(self, key: str, raw: bytes | None) -> None:
        if raw is None:
            self._remove(key)
            return
        try:
            record = decode_record(raw, self._verifier)
        except MeshError:
            self.rejected += 1
            return
        if record.key != key:
            self.rejected += 1  # a record copied under another instance's key
            return
        old = self._records.get(key)
        if old is not None and old.ts > record.ts:
            return
        self._records[key] = record
        self._reindex(record.agent)

    def _remove(self, key: str) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self._reindex(record.agent)

    def _reindex(self, agent: str) -> None:
        self._by_agent[agent] = [r for r in self._records.values() if r.agent == agent]
        self._changed.set()
        self._changed = asyncio.Event()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 4)
            now = self._clock()
            for key, record in list(self._records.items()):
                if record.ts + self._ttl < now:
                    self._remove(key)
                    if self._on_dead is not None and record.state == STATE_SERVING:
                        self._on_dead(record)

    def eject(self, key: str, seconds: float) -> None:
        """Stop picking an instance for ``seconds`` (it failed in a way that says it is gone)."""
        self._ejected[key] = self._clock() + seconds

    def get(self, key: str) -> InstanceRecord | None:
        return self._records.get(key)

    def instances(self, agent: str) -> list[InstanceRecord]:
        """Live, serving, not ejected instances of ``agent``."""
        now = self._clock()
        out = []
        for r in self._by_agent.get(agent, ()):
            if r.state != STATE_SERVING or r.ts + self._ttl < now:
                continue
            until = self._ejected.get(r.key)
            if until is not None:
                if until > now:
                    continue
                del self._ejected[r.key]
            out.append(r)
        return out

    def all(self) -> list[InstanceRecord]:
        """Every record currently held (live or not yet swept)."""
        return list(self._records.values())

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
