"""The HTTP gateway's OpenAPI 3.1 document, built from the agents' published endpoint schemas
(``Mesh.schemas``: verified against their signed directory records).

Each endpoint is ``POST /v1/{agent}/{endpoint}``: its input schema the request body, its output
schema the 200 reply (``application/json``), or each event of a ``text/event-stream`` for an
endpoint that streams. pydantic puts the models a schema refers to under ``$defs`` with
references ``#/$defs/Name``; inside an OpenAPI document such a reference would point at the
document's own root, so every schema moves to ``components/schemas`` under a name made of the
agent, the endpoint and the side (``researcher.answer.input``, ``researcher.answer.input.Q``),
and every reference is rewritten to match. Errors reference the ``Problem`` schema (RFC 9457);
the security schemes are a bearer token and the ``X-API-Key`` header.

Pure: no HTTP library, no mesh connection.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from mesh import EndpointSchema, __version__
from mesh.bridges.problems import PROBLEM_JSON, problem_schema

__all__ = ["ERROR_STATUSES", "TIMEOUT_HEADER", "openapi_document"]

TIMEOUT_HEADER = "X-Mesh-Timeout"
ERROR_STATUSES: dict[str, str] = {
    "400": "malformed JSON, or a body the endpoint's model refuses",
    "401": "no API key, or one that is malformed, unknown, expired or revoked",
    "403": "policy denied the call: rule names the rule",
    "404": "an agent this gateway does not expose, or an endpoint the agent does not have",
    "408": "the body did not arrive in time",
    "409": "the mesh refused the call in its current state (FAILED_PRECONDITION)",
    "413": "the body is larger than the gateway or the mesh takes",
    "429": "rate limited (Retry-After), or a delegation budget is spent",
    "500": "the endpoint failed (no detail is given)",
    "502": "the mesh refused the gateway's identity, or a reply did not verify",
    "503": "no instance can take the call, or the gateway cannot check revocations",
    "504": "the deadline passed before the reply",
}
_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _component(name: str) -> str:
    return _NAME.sub("_", name)


def _move_defs(schema: Mapping[str, Any], base: str, components: dict[str, Any]) -> dict[str, str]:
    """Put ``schema`` under ``components[base]`` and each of its ``$defs`` under
    ``components[base.Name]``, references rewritten; returns the reference to ``base``."""
    tree = copy.deepcopy(dict(schema))
    defs = tree.pop("$defs", {}) or {}
    names = {name: _component(f"{base}.{name}") for name in defs}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    if value == "#":
                        value = f"#/components/schemas/{base}"
                    elif value.startswith("#/$defs/"):
                        target = value[len("#/$defs/") :]
                        if target in names:
                            value = f"#/components/schemas/{names[target]}"
                    out[key] = value
                else:
                    out[key] = rewrite(value)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    components[base] = rewrite(tree)
    for name, sub in defs.items():
        components[names[name]] = rewrite(sub)
    return {"$ref": f"#/components/schemas/{base}"}


def _operation(agent: str, schema: EndpointSchema, components: dict[str, Any]) -> dict[str, Any]:
    base = _component(f"{agent}.{schema.name}")
    body = _move_defs(schema.input or {}, f"{base}.input", components)
    reply = _move_defs(schema.output or {}, f"{base}.output", components)
    if schema.streams:
        content: dict[str, Any] = {
            "text/event-stream": {
                "schema": {"type": "string", "description": "server-sent events"},
                "x-mesh-chunk": reply,
                "x-mesh-events": {
                    "message": "data: one chunk as JSON",
                    "error": "data: a Problem, then the stream ends",
                    "end": 'data: {"chunks": n, "code": "OK"}, the last event',
                },
            }
        }
        described = "the chunks, as server-sent events: data is one chunk each"
    else:
        content = {"application/json": {"schema": reply}}
        described = "the reply"
    responses: dict[str, Any] = {"200": {"description": described, "content": content}}
    for status in ERROR_STATUSES:
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op: dict[str, Any] = {
        "operationId": f"{agent}.{schema.name}",
        "tags": [agent],
        "summary": f"{agent}.{schema.name}",
        "parameters": [
            {"$ref": "#/components/parameters/Timeout"},
            {"$ref": "#/components/parameters/Traceparent"},
            {"$ref": "#/components/parameters/Tracestate"},
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": responses,
        "x-mesh-schema-hash": schema.hash,
        "x-mesh-streams": schema.streams,
        "x-mesh-idempotent": schema.idempotent,
    }
    if not schema.streams:
        op["parameters"].append({"$ref": "#/components/parameters/IdempotencyKey"})
    if schema.input is None or schema.output is None:
        op["description"] = "its schemas are not published: any JSON is passed on"
    return op


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": schema}  # fmt: skip


def openapi_document(
    agents: Mapping[str, Mapping[str, EndpointSchema]],
    *,
    title: str = "natsmesh HTTP gateway",
    missing: Mapping[str, str] | None = None,
    max_timeout: float | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the endpoints of ``agents``.

    Args:
        agents: agent name to its endpoints' schemas (``Mesh.schemas``).
        title: the document's title.
        missing: agents the gateway exposes whose schemas could not be had, and why
            (``x-mesh-missing``).
        max_timeout: the gateway's bound on ``X-Mesh-Timeout``, for its description.
    """
    components: dict[str, Any] = {"Problem": problem_schema()}
    paths: dict[str, Any] = {}
    for agent in sorted(agents):
        for name in sorted(agents[agent]):
            op = _operation(agent, agents[agent][name], components)
            paths[f"/v1/{agent}/{name}"] = {"post": op}
    bound = f", at most {max_timeout:g}" if max_timeout else ""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": __version__,
            "description": "Mesh endpoints over HTTP: each call is a mesh request made by the "
            "gateway on the key's principal's behalf (docs/gateway.md).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                f"E{status}": {
                    "description": text,
                    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                }
                for status, text in ERROR_STATUSES.items()
            },
            "parameters": {
                "Timeout": _header(
                    TIMEOUT_HEADER,
                    f"seconds the call may take{bound} (default: the mesh policy's timeout)",
                    {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                ),
                "Traceparent": _header(
                    "traceparent", "W3C trace context the mesh call continues", {"type": "string"}
                ),
                "Tracestate": _header("tracestate", "W3C trace state", {"type": "string"}),
                "IdempotencyKey": _header(
                    "Idempotency-Key",
                    "the endpoint runs at most once per key (1 to 256 characters)",
                    {"type": "string", "minLength": 1, "maxLength": 256},
                ),
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "mgk_<id>_<secret>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }
    if missing:
        doc["x-mesh-missing"] = dict(sorted(missing.items()))
    return doc
