"""The NATS services protocol (ADR-32, "micro"): agents answer ``$SRV`` discovery requests, so
``nats micro ls``, ``nats micro info <agent>`` and ``nats micro stats <agent>`` list them.

Each serving instance is one service instance: the service ``name`` is the agent name, the ``id``
is the instance id, and the endpoints are the mesh endpoints on the instance's own subjects
(``<prefix>.rpc.<agent>.<instance>.<endpoint>``). An instance answers on nine subjects::

    $SRV.PING   $SRV.PING.<agent>   $SRV.PING.<agent>.<instance>
    $SRV.INFO   $SRV.INFO.<agent>   $SRV.INFO.<agent>.<instance>
    $SRV.STATS  $SRV.STATS.<agent>  $SRV.STATS.<agent>.<instance>

with the JSON documents ``io.nats.micro.v1.ping_response``, ``info_response`` and
``stats_response``.

Exposure: these replies are plain, unsigned, unencrypted JSON, readable by any NATS user allowed
to publish to ``$SRV.>``. They reveal agent names, instance ids, versions, labels, endpoint
names and subjects, concurrency limits, the endpoints' input and output JSON Schemas, request
and error counts, the last error code and the start time -- about what the directory bucket
shows already, plus traffic counts and the schemas. Request bodies, callers, certificates and
error messages are never included. The answers cannot be trusted either: anyone may answer
``$SRV`` requests, so they serve operators' tools, never the mesh's own decisions (the signed
directory does that); the schemas are the one thing the mesh reads from them, and only after
checking each against the hash in the instance's signed record (``Mesh.schemas``). To hide
them, deny ``$SRV.>`` to untrusted NATS users, or turn the responder off with
``MeshConfig(services=False)`` (the runtime calls ``serve_services`` for every agent it serves
unless told not to; ``Mesh.schemas`` then finds nothing to fetch).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from mesh._core.names import rpc_subject
from mesh._core.schemas import publish_schemas
from mesh._runtime.ports import EndpointStats, MeshHandle
from mesh._transport.base import InboundMessage
from mesh.errors import InvalidArgument, MeshError


class Mesh(MeshHandle, Protocol):
    """What the responders read of the mesh they describe."""

    @property
    def started_at(self) -> float: ...
    @property
    def endpoint_stats(self) -> dict[str, EndpointStats]: ...


__all__ = [
    "API_PREFIX",
    "INFO_RESPONSE",
    "PING_RESPONSE",
    "STATS_RESPONSE",
    "info_response",
    "ping_response",
    "semver",
    "serve_services",
    "stats_response",
]

API_PREFIX = "$SRV"
PING_RESPONSE = "io.nats.micro.v1.ping_response"
INFO_RESPONSE = "io.nats.micro.v1.info_response"
STATS_RESPONSE = "io.nats.micro.v1.stats_response"

# Each instance listens on its own subject, with a plain subscription: there is no queue group.
# ADR-32 (revision 5, "optional queue groups") and the jsm.go schemas allow any string here, and
# nats.go reports "" for an endpoint whose queue group is disabled, so "" is both valid and
# true. Reporting nats.go's default "q" would claim load sharing that does not happen; omitting
# the field is schema-valid but nats.py's ``EndpointInfo.from_dict`` / ``EndpointStats.from_dict``
# read it unconditionally and would fail with a KeyError.
NO_QUEUE_GROUP = ""

# The regular expression semver.org suggests, as ADR-32 requires (ASCII digits only).
_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
_LOOSE_VERSION = re.compile(r"v?([0-9]{1,18})(?:\.([0-9]{1,18}))?(?:\.([0-9]{1,18}))?")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def semver(version: str) -> str:
    """``version`` as the semantic version ADR-32 requires.

    A valid semantic version is kept; ``"1.2"`` becomes ``"1.2.0"``, ``"v3"`` ``"3.0.0"``
    (leading zeros dropped); anything else becomes ``"0.0.0"``.
    """
    if _SEMVER.fullmatch(version):
        return version
    loose = _LOOSE_VERSION.fullmatch(version)
    if loose is None:
        return "0.0.0"
    return ".".join(str(int(part or 0)) for part in loose.groups())


def _started(ts: float) -> str:
    """RFC 3339 in UTC with microseconds: ``2024-05-01T12:00:00.123456Z``.

    Six fraction digits, not nine: Go parses any number, but nats.py parses ``started`` with
    ``strptime("%Y-%m-%dT%H:%M:%S.%fZ")``, which accepts at most six.
    """
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _identity(mesh: Mesh, kind: str) -> dict[str, Any]:
    agent = mesh.agent
    assert agent is not None
    metadata = {str(k): str(v) for k, v in agent.labels.items()}
    # Set last, so a label cannot pass an agent off as something else.
    metadata["mesh.prefix"] = mesh.config.prefix
    metadata["mesh.kind"] = "agent"
    return {
        "type": kind,
        "name": mesh.name,
        "id": mesh.instance,
        "version": semver(agent.version),
        "metadata": metadata,
    }


def _subject(mesh: Mesh, endpoint: str) -> str:
    return rpc_subject(mesh.config.prefix, mesh.name, mesh.instance, endpoint)


def ping_response(mesh: Mesh) -> dict[str, Any]:
    """The ``io.nats.micro.v1.ping_response`` document of a serving ``mesh``."""
    return _identity(mesh, PING_RESPONSE)


def info_response(mesh: Mesh) -> dict[str, Any]:
    """The ``io.nats.micro.v1.info_response`` document of a serving ``mesh``.

    Each endpoint with published schemas (``mesh._core.schemas``) carries them as
    ``"schema": {"request": <text>, "response": <text>}``, each the canonical JSON text of the
    schema, and their hash as the metadata ``schema``. The shape is the endpoint ``schema`` of
    ADR-32's early drafts (strings, as nats.go 1.22 to 1.25 declared them in the ``SCHEMA``
    verb's reply, removed in 1.26); today's INFO endpoints have no such key, and the clients
    that read INFO (nats.go's ``EndpointInfo``, so the ``nats`` CLI, and nats.py's
    ``EndpointInfo.from_dict``) ignore keys they do not know, as the jsm.go schema allows. A
    caller checks what it fetched against the hash in the signed directory record
    (``Mesh.schemas``): this reply is not signed.
    """
    agent = mesh.agent
    assert agent is not None
    default_concurrency = mesh.config.limits.endpoint_concurrency
    doc = _identity(mesh, INFO_RESPONSE)
    doc["description"] = agent.description or f"mesh agent {agent.name}"
    endpoints = []
    for spec in agent.endpoints.values():
        endpoint: dict[str, Any] = {
            "name": spec.name,
            "subject": _subject(mesh, spec.name),
            "queue_group": NO_QUEUE_GROUP,
            "metadata": {
                "idempotent": "true" if spec.idempotent else "false",
                "streams": "true" if spec.streams else "false",
                "concurrency": str(spec.concurrency or default_concurrency),
            },
        }
        published = publish_schemas(spec.input_type, spec.output_type)
        if published is not None:
            endpoint["metadata"]["schema"] = published.hash
            endpoint["schema"] = {"request": published.input, "response": published.output}
        endpoints.append(endpoint)
    doc["endpoints"] = endpoints
    return doc


def stats_response(mesh: Mesh) -> dict[str, Any]:
    """The ``io.nats.micro.v1.stats_response`` document of a serving ``mesh``.

    ``num_requests`` counts every request sent to the endpoint whose header decoded, including
    those refused before the handler (unauthenticated, denied, rate-limited, ...);
    ``num_errors`` those that ended in an error status or were refused, and ``last_error`` is
    that status code (for example ``RESOURCE_EXHAUSTED``), never a message. ``data.refused``
    (present once there is one) counts the refusals by code; ``average_processing_time`` is
    over the requests that reached the handler. Replies answered from the idempotency reply
    cache are not requests here; ``data`` counts them as ``replayed_from_cache``.
    """
    agent = mesh.agent
    assert agent is not None
    doc = _identity(mesh, STATS_RESPONSE)
    doc["started"] = _started(mesh.started_at or time.time())
    endpoints = []
    for spec in agent.endpoints.values():
        stats = mesh.endpoint_stats.get(spec.name)
        requests = stats.requests if stats is not None else 0
        processing = stats.processing_ns if stats is not None else 0
        refused = dict(stats.refused) if stats is not None else {}
        handled = requests - sum(refused.values())
        endpoints.append(
            {
                "name": spec.name,
                "subject": _subject(mesh, spec.name),
                "queue_group": NO_QUEUE_GROUP,
                "num_requests": requests,
                "num_errors": stats.errors if stats is not None else 0,
                "last_error": stats.last_error if stats is not None else "",
                "processing_time": processing,
                "average_processing_time": processing // handled if handled > 0 else 0,
                # Always an object: older jsm.go schemas require one, newer ones allow anything.
                "data": {
                    "replayed_from_cache": stats.replayed_from_cache if stats is not None else 0,
                    **({"refused": refused} if refused else {}),
                },
            }
        )
    doc["endpoints"] = endpoints
    return doc


async def serve_services(mesh: Mesh) -> None:
    """Answer ``$SRV`` PING, INFO and STATS requests for the agent ``mesh`` serves.

    Call it once the agent's endpoints are subscribed (``Mesh.start`` does); the subscriptions
    are drained with the agent. A caller-only ``Mesh`` (no agent) has nothing to advertise and
    subscribes nothing. Documents are built per request, so they show the current counters.

    Raises:
        InvalidArgument: the agent, instance or an endpoint name is not a valid ADR-32 name
            (mesh names always are).
        Unavailable: a subscription failed.
    """
    agent = mesh.agent
    if agent is None:
        return
    for kind, value in (
        ("agent", mesh.name),
        ("instance", mesh.instance),
        *(("endpoint", name) for name in agent.endpoints),
    ):
        if not _SERVICE_NAME.fullmatch(value):
            raise InvalidArgument(f"{kind} name {value!r} is not a valid NATS service name")
    mesh_subjects = f"{mesh.config.prefix}."

    def responder(
        build: Callable[[Mesh], dict[str, Any]],
    ) -> Callable[[InboundMessage], Awaitable[None]]:
        async def respond(msg: InboundMessage) -> None:
            reply = msg.reply
            # Never reflect unsigned JSON into the mesh's own subjects: a legitimate requester
            # waits on an inbox, so a reply subject under the prefix is someone's trick.
            if not reply or reply.startswith(mesh_subjects):
                return
            payload = json.dumps(build(mesh), separators=(",", ":")).encode()
            with contextlib.suppress(MeshError):
                await mesh.transport.publish(reply, payload)

        return respond

    for verb, build in (
        ("PING", ping_response),
        ("INFO", info_response),
        ("STATS", stats_response),
    ):
        handler = responder(build)
        for subject in (
            f"{API_PREFIX}.{verb}",
            f"{API_PREFIX}.{verb}.{mesh.name}",
            f"{API_PREFIX}.{verb}.{mesh.name}.{mesh.instance}",
        ):
            await mesh.subscribe_raw(subject, handler)
