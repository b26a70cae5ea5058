"""Signed heartbeats: a serving instance's compact liveness proof, sent over core NATS.

A beat is ``msgpack([body, signature])`` with ``body`` the msgpack encoding of the array
``["mesh-beat-v1", prefix, agent, instance, ts, up]`` and ``signature`` the instance's Ed25519
signature over those body bytes (``docs/protocol.md`` section 36). It carries no certificate: a
reader verifies it with the key of the instance's directory record it already holds, so a beat
can keep a known instance alive but never introduce one. Pure core: the subscription is in
``mesh._runtime.directory``, the publishing in ``mesh._runtime.registration``.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from nacl.signing import SigningKey

from mesh._core.signed import SIGNATURE_LEN, verify_document
from mesh.errors import DecodeError

__all__ = ["BEAT_CONTEXT", "Beat", "decode_beat", "encode_beat"]

BEAT_CONTEXT = "mesh-beat-v1"
"""The first element of every beat body: no record, certificate or proof body starts so."""

_MAX_BEAT = 512  # a beat is about 120 bytes; anything much larger is junk, not decoded


@dataclass(frozen=True, slots=True)
class Beat:
    """A decoded, not yet verified, beat.

    Attributes:
        prefix: the mesh (subject prefix) it was sent in: a beat copied to another mesh that
            the same identity serves is refused there.
        agent / instance: whose beat it says it is.
        ts: signing time, unix seconds (sent in whole milliseconds).
        up: the writer's connection epoch: it changes when the instance's connection to NATS
            was re-established (or the process restarted), so requests sent to it before then
            may have been lost.
    """

    prefix: str
    agent: str
    instance: str
    ts: float
    up: int
    body: bytes
    signature: bytes

    @property
    def key(self) -> str:
        return f"{self.agent}.{self.instance}"

    def verify(self, sign_pk: bytes) -> None:
        """Check the signature with the instance's key (from its directory record).

        Raises:
            Unauthenticated: the beat is forged or altered.
        """
        verify_document(self.body, self.signature, sign_pk, f"beat of {self.key} is forged")


def encode_beat(
    signing: SigningKey, prefix: str, agent: str, instance: str, ts_ms: int, up: int
) -> bytes:
    """Sign a beat: ``msgpack([body, signature])``."""
    body = msgpack.packb([BEAT_CONTEXT, prefix, agent, instance, ts_ms, up], use_bin_type=True)
    return msgpack.packb([body, signing.sign(body).signature], use_bin_type=True)


def decode_beat(raw: bytes) -> Beat:
    """Parse a beat without verifying it (``Beat.verify`` does).

    Raises:
        DecodeError: malformed bytes or fields of the wrong type.
    """
    if len(raw) > _MAX_BEAT:
        raise DecodeError("beat too large")
    try:
        outer = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        body_raw, sig = outer
        fields = msgpack.unpackb(body_raw, raw=False, strict_map_key=True)
        context, prefix, agent, instance, ts, up = fields
    except Exception as exc:  # msgpack and unpacking raise many types on junk
        raise DecodeError(f"malformed beat ({type(exc).__name__})") from None
    if (
        type(body_raw) is not bytes
        or type(sig) is not bytes
        or len(sig) != SIGNATURE_LEN
        or type(fields) is not list
        or context != BEAT_CONTEXT
        or type(prefix) is not str
        or type(agent) is not str
        or type(instance) is not str
        or type(ts) is not int
        or type(up) is not int
    ):
        raise DecodeError("beat has a field of the wrong type")
    return Beat(prefix, agent, instance, ts / 1000.0, up, body_raw, sig)
