"""Directory records: what one instance announces about itself, signed with its own key.

A record is ``msgpack([body, signature])`` (``docs/protocol.md``, Directory): the instance's
certificate, its endpoints, version, labels, heartbeat time, state and the policy revision it
runs. Verifying one checks the certificate against the trust root, then the signature against
the certificate. Pure core: the watch over the bucket is ``mesh._runtime.directory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from mesh._core.identity import Certificate, CertificateVerifier
from mesh._core.signed import open_document, sign_document, typed_field, verify_document
from mesh.errors import DecodeError

__all__ = [
    "STATE_DRAINING",
    "STATE_SERVING",
    "EndpointInfo",
    "InstanceRecord",
    "decode_record",
    "encode_record",
]

STATE_SERVING = "serving"
STATE_DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What callers need to know about an endpoint before calling it."""

    name: str
    idempotent: bool = False
    streams: bool = False
    """The endpoint answers with a stream of chunks (``Mesh.stream``), not one reply."""
    schema: str | None = None
    """``sha256:<hex>`` of its input and output JSON Schemas (``mesh._core.schemas``);
    ``None`` when the instance publishes none (an older natsmesh, or no JSON Schema)."""


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
    policy_error: str | None = None
    topics: tuple[str, ...] = field(default=())
    stale: str | None = None

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
    policy_error: str | None = None,
    topics: tuple[str, ...] = (),
    stale: str | None = None,
) -> bytes:
    """Sign a record with the instance's key: ``msgpack([body, signature])``."""
    body: dict[str, Any] = {
        "cert": cert.raw,
        "endpoints": [_endpoint(e) for e in endpoints],
        "version": version,
        "labels": labels,
        "ts": round(ts * 1000),
        "state": state,
        "topics": list(topics),
    }
    if policy_revision is not None:
        body["policy_revision"] = policy_revision
    if policy_error is not None:
        body["policy_error"] = policy_error
    if stale is not None:
        body["stale"] = stale
    return sign_document(body, lambda packed: signing.sign(packed).signature)


def _endpoint(e: EndpointInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"name": e.name, "idempotent": e.idempotent}
    if e.streams:  # left out when false: records of endpoints that do not stream keep their bytes
        out["streams"] = True
    if e.schema is not None:
        out["schema"] = e.schema
    return out


def decode_record(raw: bytes, verifier: CertificateVerifier) -> InstanceRecord:
    """Verify and parse a record.

    Raises:
        DecodeError: malformed bytes.
        Unauthenticated: bad certificate or bad signature.
    """
    what = "directory record"
    body, body_raw, sig = open_document(raw, what)
    cert_raw = typed_field(body, "cert", bytes, what)
    endpoints: dict[str, EndpointInfo] = {}
    for e in typed_field(body, "endpoints", list, what):
        if not isinstance(e, dict):
            raise DecodeError(f"{what} endpoints must be maps")
        name = typed_field(e, "name", str, f"{what} endpoint")
        idempotent = e.get("idempotent", False)
        streams = e.get("streams", False)
        for flag, value in (("idempotent", idempotent), ("streams", streams)):
            if type(value) is not bool:
                raise DecodeError(f"{what} endpoint field {flag!r} must be bool")
        schema = e.get("schema")  # absent in records of older instances
        if schema is not None and type(schema) is not str:
            raise DecodeError(f"{what} endpoint field 'schema' must be str")
        endpoints[name] = EndpointInfo(name, idempotent, streams, schema)
    version = typed_field(body, "version", str, what)
    labels = body.get("labels", {})
    if not isinstance(labels, dict) or not all(
        type(k) is str and type(v) is str for k, v in labels.items()
    ):
        raise DecodeError(f"{what} labels must map strings to strings")
    ts = typed_field(body, "ts", int, what) / 1000.0
    state = body.get("state", STATE_SERVING)
    rev = body.get("policy_revision")
    policy_error = body.get("policy_error")
    topics = body.get("topics", [])
    stale = body.get("stale")
    if (
        type(state) is not str
        or (rev is not None and type(rev) is not int)
        or (policy_error is not None and type(policy_error) is not str)
        or (stale is not None and type(stale) is not str)
        or type(topics) is not list
        or not all(type(t) is str for t in topics)
    ):
        raise DecodeError(f"{what} has a field of the wrong type")
    cert = verifier.verify(cert_raw)
    verify_document(
        body_raw, sig, cert.sign_pk, f"directory record of {cert.agent}.{cert.instance} is forged"
    )
    return InstanceRecord(
        certificate=cert,
        endpoints=endpoints,
        version=version,
        labels=labels,
        ts=ts,
        state=state,
        policy_revision=rev,
        policy_error=policy_error,
        topics=tuple(topics),
        stale=stale,
    )
