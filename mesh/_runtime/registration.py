"""This instance's own directory record: announce, heartbeat, acknowledge policy, drain, withdraw.

The record is signed with the instance's key (``mesh._core.records``) and written under
``<agent>.<instance>`` in the directory bucket; it carries the policy revision the instance
runs (its ACK) or the error that made it refuse one (its NACK). Every heartbeat also publishes
a signed beat (``mesh._core.beats``) on core NATS, so callers hear that the instance lives
while the bucket or its watch is stalled; the beat goes first and never waits for the put.
Signed ``ts`` rise strictly across records and beats: readers ignore one not newer than the
last they accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from mesh._core.beats import encode_beat
from mesh._core.identity import Identity
from mesh._core.records import STATE_SERVING, EndpointInfo, encode_record
from mesh._core.schemas import publish_schemas
from mesh._log import get_logger
from mesh._runtime.agent import Agent, EndpointSpec
from mesh._runtime.directory import DirectoryBucket
from mesh._runtime.governance import Governance
from mesh.errors import MeshError

__all__ = ["Registration"]

log = get_logger(__name__)


class Registration:
    """Writes and refreshes one instance's signed directory record.

    Args:
        agent: the agent served.
        identity: a getter for the current identity (the certificate changes on renewal).
        governance: the policy revision in force, acknowledged in the record.
        heartbeat: seconds between refreshes.
    """

    def __init__(
        self,
        agent: Agent,
        identity: Callable[[], Identity],
        governance: Governance,
        heartbeat: float,
    ) -> None:
        self._agent = agent
        self._identity = identity
        self._governance = governance
        self._heartbeat = heartbeat
        # Set at start: a failed write re-creates the bucket if someone deleted it.
        self.bucket: DirectoryBucket | None = None
        # Set at start: publishes a beat on this instance's beat subject.
        self.send_beat: Callable[[bytes], Awaitable[None]] | None = None
        self.prefix = "mesh"  # the mesh the beats are sent in (set at start)
        self.up = 1  # the connection epoch the beats carry: raised on every reconnect
        identity_now = identity()
        self.key = f"{identity_now.agent}.{identity_now.instance}"
        self._last_ms = 0  # the ts of the last record or beat signed
        self._put: asyncio.Task[None] | None = None

    def _next_ms(self) -> int:
        """Now, in whole milliseconds, and later than the last record's or beat's ``ts``: two
        records in one millisecond (a heartbeat, then a draining record) must not look like a
        replay."""
        ms = max(int(time.time() * 1000), self._last_ms + 1)
        self._last_ms = ms
        return ms

    def _next_ts(self) -> float:
        return self._next_ms() / 1000

    def record(self, state: str = STATE_SERVING) -> bytes:
        """The signed record as it stands now."""
        identity = self._identity()
        agent = self._agent
        return encode_record(
            identity.keys.signing,
            identity.certificate,
            endpoints=[
                EndpointInfo(s.name, s.idempotent, s.streams, _schema_hash(s))
                for s in agent.endpoints.values()
            ],
            version=agent.version,
            labels=agent.labels,
            ts=self._next_ts(),
            state=state,
            policy_revision=self._governance.revision,
            policy_error=self._governance.error,
            stale=self._governance.stale,
        )

    async def register(self, state: str = STATE_SERVING) -> None:
        """Write the record.

        Raises:
            Unavailable: JetStream could not be reached.
        """
        assert self.bucket is not None
        generation = self.bucket.generation
        kv = await self.bucket.open()
        try:
            await kv.put(self.key, self.record(state))
        except MeshError:
            with contextlib.suppress(MeshError):  # unreachable: report the write's own error
                await self.bucket.recover()
            if self.bucket.generation == generation:
                raise  # the bucket was not replaced: the write itself failed
            await (await self.bucket.open()).put(self.key, self.record(state))

    async def register_quietly(self) -> None:
        """Write the record; a failure is logged, and the next heartbeat tries again."""
        try:
            await self.register()
        except MeshError as exc:
            log.warning("mesh.register_failed", error=exc.message)

    def beat_bytes(self) -> bytes:
        """A signed beat as of now."""
        identity = self._identity()
        return encode_beat(
            identity.keys.signing,
            self.prefix,
            identity.agent,
            identity.instance,
            self._next_ms(),
            self.up,
        )

    async def beat(self) -> None:
        """Publish a signed beat (core NATS: no JetStream, no acknowledgement); a failure is
        ignored, the next heartbeat sends another."""
        if self.send_beat is not None:
            with contextlib.suppress(MeshError):
                await self.send_beat(self.beat_bytes())

    async def heartbeat(self, serving: Callable[[], bool]) -> None:
        """Every heartbeat while ``serving()`` holds: a beat, then the record. A put still
        waiting for JetStream (a stream leader election) is not doubled, and never holds the
        next beat back."""
        try:
            while serving():
                await asyncio.sleep(self._heartbeat)
                if not serving():
                    break
                await self.beat()
                if self._put is None or self._put.done():
                    self._put = asyncio.create_task(self.register_quietly(), name="mesh-put")
        finally:
            if self._put is not None:
                self._put.cancel()

    async def reconnected(self) -> None:
        """After the connection was re-established: a new epoch, announced by a beat at once
        (callers resend what they had in flight here), then the record.

        Raises:
            Unavailable: JetStream could not be reached for the record.
        """
        self.up += 1
        await self.beat()
        await self.register()

    async def withdraw(self) -> None:
        """Delete the record (the last step of a drain)."""
        assert self.bucket is not None
        await (await self.bucket.open()).delete(self.key)


def _schema_hash(spec: EndpointSpec) -> str | None:
    """The hash of the endpoint's published schemas (computed once per pair of models)."""
    published = publish_schemas(spec.input_type, spec.output_type)
    return published.hash if published is not None else None
