"""Hand-built delegation links and requests for ``test_delegation_attacks.py``.

An attacker here is a plain nats-py connection plus the keys of some identity it holds (an
insider's real certificate and keys, or a certificate of another root): it signs links with
whatever key it likes, puts ``chain + body`` in the sealed plaintext with ``dc`` in the header,
exactly as ``ClientPipeline.attempt`` does (``request_header``, ``seal_frame``,
``derive_pair_key``), and reads back the answer: a sealed error REPLY once the callee
authenticated it (what a chain refusal is), an unsealed REFUSAL before that.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.signing import SigningKey
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel

import mesh
from mesh import Identity
from mesh._core.crypto import derive_pair_key, open_frame, seal_frame
from mesh._core.delegation import LINK_TYPE, encode_chain, link_digest
from mesh._core.envelope import HDR_DEADLINE, Kind, decode_frame, request_header
from mesh._core.names import rpc_subject
from mesh._core.signed import sign_document
from mesh.errors import MeshError, error_from_code

WAIT = 5.0
AUTO = object()
"""``dc``: the chain's real length (the default of ``send``)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def make_link(
    signing: SigningKey,
    cert_raw: bytes,
    *,
    chain: bytes,
    to: str,
    req: bytes,
    exp: int,
    ep: str = "hop",
    prev: bytes | None = None,
    calls: tuple[str, ...] = ("*.*",),
    scopes: tuple[str, ...] = (),
    depth: int = 7,
    budget: int | None = None,
    cost: int | None = None,
    origin: str | None = None,
    **extra: Any,
) -> bytes:
    """A ``mesh.link.v1`` document with any fields, signed by ``signing`` whatever
    certificate it names (``extra`` adds or replaces raw body fields)."""
    body: dict[str, Any] = {
        "type": LINK_TYPE, "cert": cert_raw, "chain": chain, "to": to, "ep": ep, "req": req,
        "calls": list(calls), "scopes": list(scopes), "depth": depth, "exp": exp,
    }  # fmt: skip
    for key, value in (("prev", prev), ("budget", budget), ("cost", cost), ("origin", origin)):
        if value is not None:
            body[key] = value
    body.update(extra)
    return sign_document(body, lambda packed: signing.sign(packed).signature)


def link_by(identity: Identity, **fields: Any) -> bytes:
    """A link signed by ``identity``'s own key over its own certificate."""
    return make_link(identity.keys.signing, identity.certificate.raw, **fields)


def next_link(
    identity: Identity, parent: mesh.Delegation, *, to: str, req: bytes, **overrides: Any
) -> bytes:
    """The link ``identity`` adds to ``parent`` (what ``delegation.extend`` would sign, without
    its checks): by default exactly what the parent allows; ``overrides`` change any field."""
    fields: dict[str, Any] = {
        "chain": parent.chain, "prev": link_digest(parent.links[-1]), "to": to, "req": req,
        "calls": parent.calls, "scopes": parent.scopes, "depth": max(parent.remaining - 1, 0),
        "exp": parent.expires, "budget": parent.budget, "cost": parent.cost,
    }  # fmt: skip
    fields.update(overrides)
    return link_by(identity, **fields)


def link_body(raw: bytes) -> dict[str, Any]:
    body, _sig = msgpack.unpackb(raw, raw=False)
    return msgpack.unpackb(body, raw=False)  # type: ignore[no-any-return]


def tamper(raw: bytes, **changes: Any) -> bytes:
    """A link with body fields changed but its original signature kept."""
    body_bytes, sig = msgpack.unpackb(raw, raw=False)
    body = msgpack.unpackb(body_bytes, raw=False)
    body.update(changes)
    return msgpack.packb([msgpack.packb(body, use_bin_type=True), sig], use_bin_type=True)


@dataclass
class Answer:
    """What came back: a sealed REPLY (``sealed``) or an unsealed REFUSAL."""

    sealed: bool
    status: str
    body: bytes
    message: str
    rule: str | None

    @property
    def error(self) -> MeshError:
        assert self.status != "OK", f"the request was served: {self.body!r}"
        return error_from_code(self.status, self.message, rule=self.rule)


class Attacker:
    """A raw NATS connection sending requests with ``identity``'s keys."""

    def __init__(self, nc: NatsClient, identity: Identity) -> None:
        self.nc = nc
        self.identity = identity

    def key(self, target: mesh.Mesh) -> bytes:
        return derive_pair_key(
            self.identity.keys.box, target.identity.certificate.box_pk, target.config.prefix
        )

    def frame(
        self,
        target: mesh.Mesh,
        links: list[bytes] | bytes | None,
        body: BaseModel | bytes,
        *,
        endpoint: str = "hop",
        rid: bytes | None = None,
        dl: int | None = None,
        dc: Any = AUTO,
    ) -> tuple[bytes, dict[str, str], bytes]:
        """``(frame, readable headers, request id)``: ``links`` a list of links (encoded as
        the client does), raw chain bytes, or ``None`` (no chain)."""
        me = self.identity
        rid = rid or os.urandom(16)
        dl = dl if dl is not None else now_ms() + 3000
        chain = b"" if links is None else links if isinstance(links, bytes) else encode_chain(links)
        payload = body if isinstance(body, bytes) else body.model_dump_json().encode()
        length = (len(chain) if links is not None else None) if dc is AUTO else dc
        aad = request_header(
            rid, now_ms(), me.agent, me.instance, target.name, target.instance, endpoint, dl, 1,
            me.certificate.raw, None, None, None, delegation=length,
        )  # fmt: skip
        return seal_frame(self.key(target), aad, chain + payload), {HDR_DEADLINE: str(dl)}, rid

    async def deliver(
        self, target: mesh.Mesh, frame: bytes, headers: dict[str, str], endpoint: str = "hop"
    ) -> Answer:
        subject = rpc_subject(target.config.prefix, target.name, target.instance, endpoint)
        msg = await self.nc.request(subject, frame, timeout=WAIT, headers=headers)
        hdr, end = decode_frame(msg.data)
        if hdr.kind == Kind.REFUSAL:
            return Answer(False, hdr.status or "", b"", hdr.message or "", hdr.rule)
        assert hdr.kind == Kind.REPLY, hdr
        body = open_frame(self.key(target), msg.data, end)
        message, rule = "", None
        if hdr.status != "OK":
            wire = json.loads(body)
            message, rule = wire.get("message", ""), wire.get("rule")
        return Answer(True, hdr.status or "", body, message, rule)

    async def send(
        self,
        target: mesh.Mesh,
        links: list[bytes] | bytes | None,
        body: BaseModel | bytes,
        **kw: Any,
    ) -> Answer:
        frame, headers, _rid = self.frame(target, links, body, **kw)
        return await self.deliver(target, frame, headers, kw.get("endpoint", "hop"))


async def tap(nc: NatsClient, subject: str) -> Any:
    """A subscription the server is known to deliver to when this returns (``flush`` is not
    enough: see ``test_attacks.settle``): a message echoed through the connection proves it."""
    sub = await nc.subscribe(subject)
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox)
    await nc.publish(inbox, b"")
    await echo.next_msg(timeout=WAIT)
    await echo.unsubscribe()
    return sub
