"""Fetching an agent's published endpoint schemas, checked against its signed directory record.

An instance serves its endpoints' JSON Schemas in its ``$SRV`` INFO reply
(``mesh._runtime.services``) and signs their hashes into its directory record
(``mesh._core.records``). The reply is plain JSON anyone on the broker may forge, the record is
not: ``fetch_schemas`` asks one live instance for its INFO and accepts the schemas only when
every endpoint's hash, recomputed from what arrived, is the one its record announces
(``docs/protocol.md`` sections 19 and 33). The schemas are content-addressed, so any reply
that matches is the truth, whoever sent it; one that does not is a lie or a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any

from mesh._core.records import InstanceRecord
from mesh._core.schemas import EndpointSchema, schema_hash
from mesh._runtime.services import API_PREFIX, INFO_RESPONSE
from mesh._transport.base import InboundMessage, Transport, is_no_responders
from mesh.errors import InvalidArgument, MeshError, Unauthenticated, Unavailable

__all__ = ["INFO_GRACE", "fetch_schemas", "verify_info"]

INFO_GRACE = 0.25
"""After a reply that does not match the record, how long (seconds) to wait for one that does
before failing: a forger may answer first, the instance itself a moment later."""
_MAX_REPLIES = 16  # replies queued per request; beyond, a flood is dropped


class _NotTheReply(Exception):
    """A message on the inbox that is not the INFO reply of the instance asked."""


class _Mismatch(Exception):
    """An endpoint's served schemas are not those its record's hash names."""


async def fetch_schemas(
    transport: Transport, agent: str, records: list[InstanceRecord], deadline: float
) -> dict[str, EndpointSchema]:
    """The published schemas of ``agent``, from the first of its live instances (in random
    order) that answers, each endpoint's checked against that instance's signed record.

    Args:
        transport: the broker connection.
        agent: the agent.
        records: its live instances' verified directory records.
        deadline: ``time.monotonic()`` by which to give up.

    Returns:
        Endpoint name to its schemas, for every endpoint the record lists (one the record
        has no hash for comes with ``None`` schemas: it publishes none).

    Raises:
        Unauthenticated: the schemas an instance served do not match its signed record.
        Unavailable: no instance answered (none serves ``$SRV``: ``MeshConfig.services``
            off), or none in time.
    """
    candidates = list(records)
    random.shuffle(candidates)
    last: MeshError | None = None
    for i, record in enumerate(candidates):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return await _fetch_from(transport, record, left / (len(candidates) - i))
        except Unavailable as exc:
            last = exc
    raise last or Unavailable(f"no live instance of agent {agent!r} to ask for its schemas")


async def _fetch_from(
    transport: Transport, record: InstanceRecord, wait: float
) -> dict[str, EndpointSchema]:
    subject = f"{API_PREFIX}.INFO.{record.agent}.{record.instance}"
    replies: asyncio.Queue[InboundMessage] = asyncio.Queue(_MAX_REPLIES)

    async def on_reply(msg: InboundMessage) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            replies.put_nowait(msg)

    inbox = transport.new_inbox()
    sub = await transport.subscribe(inbox, on_reply)
    loop = asyncio.get_running_loop()
    try:
        await transport.publish(subject, b"", reply=inbox)
        end = loop.time() + wait
        mismatch: Unauthenticated | None = None
        while (left := end - loop.time()) > 0:
            try:
                msg = await asyncio.wait_for(replies.get(), left)
            except TimeoutError:
                break
            if is_no_responders(msg):
                raise Unavailable(
                    f"instance {record.key} does not answer $SRV.INFO (its MeshConfig.services "
                    "is off?), so its schemas cannot be fetched",
                    subject=subject,
                )
            try:
                return verify_info(msg.data, record)
            except _NotTheReply:
                continue
            except Unauthenticated as exc:
                if mismatch is None:
                    mismatch = exc
                    end = min(end, loop.time() + INFO_GRACE)
        if mismatch is not None:
            raise mismatch
        raise Unavailable(
            f"instance {record.key} did not answer $SRV.INFO within {wait:.1f} s",
            subject=subject,
        )
    finally:
        with contextlib.suppress(MeshError):
            await sub.unsubscribe()


def verify_info(data: bytes, record: InstanceRecord) -> dict[str, EndpointSchema]:
    """The schemas of an INFO reply (``io.nats.micro.v1.info_response``), checked against the
    instance's signed ``record``.

    Raises:
        _NotTheReply: the message is not the INFO reply of this instance (ignored).
        Unauthenticated: it is, and an endpoint's schemas are missing, malformed, or hash to
            something else than the record announces.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise _NotTheReply from None
    if not (
        isinstance(doc, dict)
        and doc.get("type") == INFO_RESPONSE
        and doc.get("name") == record.agent
        and doc.get("id") == record.instance
    ):
        raise _NotTheReply
    served: dict[str, Any] = {}
    duplicated: set[str] = set()
    endpoints = doc.get("endpoints")
    for entry in endpoints if isinstance(endpoints, list) else []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str):
            if name in served:
                duplicated.add(name)
            served[name] = entry
    out: dict[str, EndpointSchema] = {}
    for name, info in record.endpoints.items():
        if info.schema is None:  # nothing signed to check against: not published
            out[name] = EndpointSchema(name, None, None, None, info.streams, info.idempotent)
            continue
        try:
            if name in duplicated:
                raise _Mismatch("listed twice")
            given, answered = _served_schemas(served.get(name), info.schema)
        except _Mismatch as exc:
            raise Unauthenticated(
                f"the schemas served by {record.agent} instance {record.instance} do not match "
                f"its signed directory record: the broker or the instance altered them "
                f"(endpoint {name!r}: {exc})"
            ) from None
        out[name] = EndpointSchema(
            name, given, answered, info.schema, info.streams, info.idempotent
        )
    return out


def _served_schemas(entry: Any, expected: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(input, output)`` schemas of one INFO endpoint entry, which must hash to
    ``expected``.

    Raises:
        _Mismatch: saying what is wrong with them.
    """
    if entry is None:
        raise _Mismatch("not in the reply")
    schema = entry.get("schema")
    request = schema.get("request") if isinstance(schema, dict) else None
    response = schema.get("response") if isinstance(schema, dict) else None
    if not (isinstance(request, str) and isinstance(response, str)):
        raise _Mismatch("no schema")
    try:
        given, answered = json.loads(request), json.loads(response)
        got = schema_hash(given, answered)
    except (ValueError, RecursionError, InvalidArgument):
        raise _Mismatch("a schema is not JSON") from None
    if got != expected:
        raise _Mismatch(f"they hash to {got}, the record says {expected}")
    if not (isinstance(given, dict) and isinstance(answered, dict)):
        raise _Mismatch("a schema is not a JSON object")
    return given, answered
