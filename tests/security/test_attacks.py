"""Attacks on a served agent by a client that holds NATS access but not bob's or alice's keys.

The victim ``bob`` serves ``echo`` and ``slow`` (both count their calls) and listens to alice's
``news`` and ``alerts`` events; ``alice`` is a legitimate caller. The attacker is a plain nats-py
client: it sends hand-built frames to bob's instance subject with its own reply inbox and reads
back the unsealed REFUSAL frame. Every refusal test checks the wire code, that no handler ran,
and that bob counted the refusal under that code. Some attacks are by ``mallory``, an insider
with a valid certificate of its own from the same root.

Frames are built with the same layout as ``Mesh._attempt``. Some are captured off the wire
(the attacker subscribes to ``mesh.rpc.>`` while alice calls bob); tampering tests start from a
genuine frame sealed with alice's keys that bob has not yet seen (a frame intercepted in
transit), so that the replay guard cannot be what refuses it and the check under test must.
"""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
import pytest
import pytest_asyncio
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from pydantic import BaseModel

import mesh
from mesh import Agent, Context, Identity, Limits
from mesh._core.crypto import derive_pair_key, open_body, seal_body
from mesh._core.envelope import (
    HDR_DEADLINE,
    HDR_TRACEPARENT,
    HDR_TRACESTATE,
    MAGIC,
    PREFIX,
    Header,
    Kind,
    decode_frame,
    encode_frame,
)
from mesh._core.records import EndpointInfo, encode_record
from mesh.testing import Trust, test_config, wait_until

pytestmark = pytest.mark.integration

MAX_BODY = 4096  # bob's Limits.max_body: small, so an oversized frame is cheap to send
WAIT = 5.0  # generous timeout for anything that should arrive at once (shared CI hosts)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "vendor=opaque"


class Note(BaseModel):
    text: str


@dataclass
class Seen:
    """What bob's handlers observed: calls as ``instance:endpoint``, events as their text.

    ``gate`` holds the ``slow`` endpoint until the attacker has sent its forged reply.
    """

    calls: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


def victim_agent(seen: Seen) -> Agent:
    bob = Agent("bob")

    @bob.endpoint
    async def echo(note: Note, ctx: Context) -> Note:
        seen.calls.append(f"{ctx.mesh.instance}:echo")
        return Note(text=f"bob:{note.text[:16]}")

    @bob.endpoint
    async def slow(note: Note, ctx: Context) -> Note:
        seen.calls.append(f"{ctx.mesh.instance}:slow")
        await asyncio.wait_for(seen.gate.wait(), WAIT)
        return Note(text=f"bob:{note.text[:16]}")

    @bob.on_event("alice", "news")
    async def news(note: Note) -> None:
        seen.events.append(note.text)

    @bob.on_event("alice", "alerts")
    async def alerts(note: Note) -> None:
        seen.events.append(f"alert:{note.text}")

    return bob


def bob_config(url: str) -> mesh.MeshConfig:
    return test_config([url], limits=Limits(max_body=MAX_BODY))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest_asyncio.fixture
async def bob(nats_server: Any, trust: Trust, seen: Seen) -> AsyncIterator[mesh.Mesh]:
    identity = trust.identity("bob")
    async with mesh.Mesh(identity, bob_config(nats_server.url), agent=victim_agent(seen)) as m:
        yield m


@pytest_asyncio.fixture
async def alice(nats_server: Any, trust: Trust, bob: mesh.Mesh) -> AsyncIterator[mesh.Mesh]:
    cfg = test_config([nats_server.url], limits=Limits(max_body=MAX_BODY))
    async with mesh.Mesh(trust.identity("alice"), cfg) as m:
        await m.wait_for("bob")
        yield m


@pytest_asyncio.fixture
async def attacker(nats_server: Any) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def mallory(trust: Trust) -> Identity:
    """An insider: a valid certificate from the mesh's own root, under its own name."""
    return trust.identity("mallory")


# --- frame building (the layout of Mesh._attempt / Mesh._send_reply / Mesh.publish) -------------


def pack_header(fields: dict[str, Any]) -> bytes:
    """Prefix and msgpack header: the associated data of a seal."""
    hb = msgpack.packb(fields, use_bin_type=True)
    return PREFIX.pack(MAGIC, len(hb)) + hb


def split_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """The raw header map and the (sealed) body of a frame."""
    _magic, hlen = PREFIX.unpack_from(frame)
    end = PREFIX.size + hlen
    return msgpack.unpackb(frame[PREFIX.size : end], raw=False), frame[end:]


def seal(fields: dict[str, Any], key: bytes, plaintext: bytes) -> bytes:
    aad = pack_header(fields)
    return aad + seal_body(key, aad, plaintext)


def pair_key(sender: Identity, target: mesh.Mesh) -> bytes:
    return derive_pair_key(sender.keys.box, target.identity.certificate.box_pk)


def request_fields(
    sender: Identity,
    target: mesh.Mesh,
    endpoint: str = "echo",
    *,
    traced: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A request header as ``Mesh._attempt`` writes it; ``overrides`` replace fields by key."""
    fields: dict[str, Any] = {
        "k": Kind.REQUEST.value,
        "id": os.urandom(16),
        "ts": int(time.time() * 1000),
        "fa": sender.agent,
        "fi": sender.instance,
        "ta": target.name,
        "ti": target.instance,
        "ep": endpoint,
        "dl": int((time.time() + 5) * 1000),
        "at": 1,
        "ct": sender.certificate.raw,
    }
    if traced:
        fields["tp"] = TRACEPARENT
        fields["tst"] = TRACESTATE
    fields.update(overrides)
    return fields


def readable_headers(fields: dict[str, Any]) -> dict[str, str]:
    """The readable NATS headers that must mirror the sealed header."""
    headers = {HDR_DEADLINE: str(fields["dl"])}
    if "tp" in fields:
        headers[HDR_TRACEPARENT] = fields["tp"]
    if "tst" in fields:
        headers[HDR_TRACESTATE] = fields["tst"]
    return headers


def genuine_request(
    sender: Identity, target: mesh.Mesh, text: str = "hi", **kw: Any
) -> tuple[bytes, dict[str, str]]:
    """A correctly sealed request from ``sender``: frame and readable headers."""
    fields = request_fields(sender, target, **kw)
    body = Note(text=text).model_dump_json().encode()
    return seal(fields, pair_key(sender, target), body), readable_headers(fields)


def rpc_subject(target: mesh.Mesh, endpoint: str = "echo") -> str:
    return f"mesh.rpc.{target.name}.{target.instance}.{endpoint}"


def event_frame(
    sender: Identity,
    topic: str,
    text: str,
    *,
    signing: SigningKey | None = None,
    from_agent: str | None = None,
    traced: bool = False,
) -> bytes:
    """An event as ``Mesh.publish`` writes it, signed by ``signing`` (default: sender's key)."""
    header = Header(
        kind=Kind.EVENT,
        id=os.urandom(16),
        ts=int(time.time() * 1000),
        from_agent=from_agent or sender.agent,
        from_instance=sender.instance,
        name=topic,
        cert=sender.certificate.raw,
        traceparent=TRACEPARENT if traced else None,
        tracestate=TRACESTATE if traced else None,
    )
    frame, _ = encode_frame(header, Note(text=text).model_dump_json().encode())
    key = signing or sender.keys.signing
    return frame + key.sign(frame).signature


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


async def settle(nc: NatsClient) -> None:
    """Return once the server has processed every command this client sent before.

    ``flush()`` is not enough: nats-py writes its PING straight to the socket, ahead of
    commands still in its send buffer, so the PONG can come back before an earlier SUB or PUB
    was processed. A message echoed through the connection proves it (one connection's
    commands are handled in order).
    """
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox)
    await nc.publish(inbox, b"")
    await echo.next_msg(timeout=WAIT)
    await echo.unsubscribe()


async def tap(nc: NatsClient, subject: str) -> Subscription:
    """A subscription the server is known to deliver to when this returns."""
    sub = await nc.subscribe(subject)
    await settle(nc)
    return sub


async def inject(
    nc: NatsClient, subject: str, data: bytes, headers: dict[str, str] | None = None
) -> None:
    """Publish, and return once the server has routed it (so it precedes later messages)."""
    await nc.publish(subject, data, headers=headers)
    await settle(nc)


async def send(
    nc: NatsClient, subject: str, frame: bytes, headers: dict[str, str] | None = None
) -> Header:
    """Send a frame as a request and return the decoded answer's header."""
    msg = await nc.request(subject, frame, timeout=WAIT, headers=headers)
    header, _ = decode_frame(msg.data)
    return header


async def assert_refused(
    nc: NatsClient,
    subject: str,
    frame: bytes,
    headers: dict[str, str] | None,
    code: str,
    because: str,
) -> Header:
    """Send ``frame`` and check it comes back as a REFUSAL with ``code`` and reason ``because``."""
    header = await send(nc, subject, frame, headers)
    assert header.kind == Kind.REFUSAL
    assert header.status == code
    assert because in (header.message or "")
    return header


async def genuine_event_barrier(alice: mesh.Mesh, seen: Seen, before: int = 0) -> None:
    """Publish a genuine event and wait for it: every earlier event has then been processed."""
    await alice.publish("news", Note(text="genuine"))
    await wait_until(lambda: "genuine" in seen.events, timeout=WAIT)
    assert seen.events.count("genuine") == 1
    assert len(seen.events) == before + 1


# --- control: the hand-built frames are the real format ----------------------------------------


async def test_hand_built_request_from_a_valid_member_is_served(
    bob: mesh.Mesh, attacker: NatsClient, mallory: Identity, seen: Seen
) -> None:
    """A frame built by these helpers and sealed with the sender's own keys is served (control)."""
    frame, headers = genuine_request(mallory, bob, "hello")
    msg = await attacker.request(rpc_subject(bob), frame, timeout=WAIT, headers=headers)
    header, end = decode_frame(msg.data)
    assert header.kind == Kind.REPLY
    assert header.status == "OK"
    body = open_body(pair_key(mallory, bob), msg.data[:end], msg.data[end:])
    assert Note.model_validate_json(body).text == "bob:hello"
    assert seen.calls == [f"{bob.instance}:echo"]
    assert bob.stats.refused == {}


# --- forged sender -----------------------------------------------------------------------------


async def test_request_claiming_alice_with_attackers_certificate_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, mallory: Identity, seen: Seen
) -> None:
    """A valid certificate of another agent cannot claim to be alice (fa/fi say alice)."""
    fields = request_fields(mallory, bob, fa="alice", fi=alice.instance)
    frame = seal(fields, pair_key(mallory, bob), b'{"text":"x"}')
    await assert_refused(
        attacker,
        rpc_subject(bob),
        frame,
        readable_headers(fields),
        "UNAUTHENTICATED",
        "does not match its certificate",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_alices_certificate_sealed_by_another_key_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """Alice's public certificate is useless without her box key: the seal does not verify."""
    fields = request_fields(alice.identity, bob)
    wrong_key = derive_pair_key(PrivateKey.generate(), bob.identity.certificate.box_pk)
    frame = seal(fields, wrong_key, b'{"text":"x"}')
    await assert_refused(
        attacker,
        rpc_subject(bob),
        frame,
        readable_headers(fields),
        "UNAUTHENTICATED",
        "seal does not verify",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- tampering ---------------------------------------------------------------------------------


async def test_request_with_flipped_ciphertext_byte_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """One flipped bit in the sealed body of a genuine request fails the seal."""
    frame, headers = genuine_request(alice.identity, bob)
    await assert_refused(
        attacker,
        rpc_subject(bob),
        flip(frame, len(frame) - 20),
        headers,
        "UNAUTHENTICATED",
        "seal does not verify",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_altered_attempt_number_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """The header is the seal's associated data: re-encoding it with another attempt fails."""
    frame, headers = genuine_request(alice.identity, bob)
    fields, sealed = split_frame(frame)
    fields["at"] = 2
    await assert_refused(
        attacker,
        rpc_subject(bob),
        pack_header(fields) + sealed,
        headers,
        "UNAUTHENTICATED",
        "seal does not verify",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_extended_deadline_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """Extending the deadline in the header and the readable header alike fails the seal."""
    frame, _headers = genuine_request(alice.identity, bob)
    fields, sealed = split_frame(frame)
    fields["dl"] += 60_000
    await assert_refused(
        attacker,
        rpc_subject(bob),
        pack_header(fields) + sealed,
        readable_headers(fields),
        "UNAUTHENTICATED",
        "seal does not verify",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_altered_readable_traceparent_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A readable ``traceparent`` that differs from the sealed one is refused, frame untouched."""
    frame, headers = genuine_request(alice.identity, bob, traced=True)
    headers[HDR_TRACEPARENT] = "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01"
    await assert_refused(
        attacker,
        rpc_subject(bob),
        frame,
        headers,
        "UNAUTHENTICATED",
        "readable NATS headers differ",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_altered_readable_deadline_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A readable ``Mesh-Deadline`` that differs from the sealed one is refused, frame untouched."""
    frame, headers = genuine_request(alice.identity, bob)
    headers[HDR_DEADLINE] = str(int(headers[HDR_DEADLINE]) + 60_000)
    await assert_refused(
        attacker,
        rpc_subject(bob),
        frame,
        headers,
        "UNAUTHENTICATED",
        "readable NATS headers differ",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- replay ------------------------------------------------------------------------------------


async def test_replayed_genuine_request_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine request captured off the wire and re-sent byte for byte is refused."""
    wire = await tap(attacker, "mesh.rpc.>")
    answer = await alice.request("bob", "echo", Note(text="once"), Note)
    assert answer.text == "bob:once"
    captured = await wire.next_msg(timeout=WAIT)
    await assert_refused(
        attacker,
        captured.subject,
        captured.data,
        captured.headers,
        "UNAUTHENTICATED",
        "replayed message id",
    )
    assert seen.calls == [f"{bob.instance}:echo"]
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_replayed_request_with_fresh_id_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """Giving a captured request a new id to dodge the replay guard breaks its seal."""
    wire = await tap(attacker, "mesh.rpc.>")
    await alice.request("bob", "echo", Note(text="once"), Note)
    captured = await wire.next_msg(timeout=WAIT)
    fields, sealed = split_frame(captured.data)
    fields["id"] = os.urandom(16)
    fields["ts"] = int(time.time() * 1000)
    await assert_refused(
        attacker,
        captured.subject,
        pack_header(fields) + sealed,
        captured.headers,
        "UNAUTHENTICATED",
        "seal does not verify",
    )
    assert seen.calls == [f"{bob.instance}:echo"]
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- certificates ------------------------------------------------------------------------------


async def test_request_with_expired_certificate_is_refused(
    nats_server: Any, bob: mesh.Mesh, trust: Trust, seen: Seen
) -> None:
    """A real client whose certificate expired an hour ago is refused by the callee. The
    refusal is unsealed, so the client only quotes it when its deadline passes."""
    expired = trust.identity("mallory", ttl=3600, now=time.time() - 7200)
    async with mesh.Mesh(expired, test_config([nats_server.url])) as mallory:
        await mallory.wait_for("bob")
        with pytest.raises(mesh.DeadlineExceeded, match=r"UNAUTHENTICATED: .*expired"):
            await mallory.request("bob", "echo", Note(text="x"), Note, timeout=0.5)
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_with_certificate_from_another_root_is_refused(
    bob: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """An "alice" certified by another trust root is refused, however well it seals."""
    impostor = Trust().identity("alice")
    frame, headers = genuine_request(impostor, bob)
    await assert_refused(
        attacker, rpc_subject(bob), frame, headers, "UNAUTHENTICATED", "not by this mesh's"
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_certificate_from_another_root_claiming_this_issuer_is_refused(
    bob: mesh.Mesh, trust: Trust, attacker: NatsClient, seen: Seen
) -> None:
    """A certificate relabelled with this root's issuer id fails the root's signature check."""
    other = Trust()
    impostor = other.identity("alice")
    body, _sig = msgpack.unpackb(impostor.certificate.raw, raw=False)
    cert_map = msgpack.unpackb(body, raw=False)
    cert_map["issuer"] = trust.root.key_id
    forged_body = msgpack.packb(cert_map, use_bin_type=True)
    forged_cert = msgpack.packb([forged_body, other.root.sign(forged_body)], use_bin_type=True)
    fields = request_fields(impostor, bob, ct=forged_cert)
    frame = seal(fields, pair_key(impostor, bob), b'{"text":"x"}')
    await assert_refused(
        attacker,
        rpc_subject(bob),
        frame,
        readable_headers(fields),
        "UNAUTHENTICATED",
        "bad signature",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- addressing --------------------------------------------------------------------------------


async def test_request_redirected_to_another_instance_is_refused(
    nats_server: Any,
    bob: mesh.Mesh,
    alice: mesh.Mesh,
    trust: Trust,
    attacker: NatsClient,
    seen: Seen,
) -> None:
    """A captured request sealed for one bob instance is refused by the other one."""
    cfg = bob_config(nats_server.url)
    async with mesh.Mesh(trust.identity("bob"), cfg, agent=victim_agent(seen)) as bob2:
        wire = await tap(attacker, "mesh.rpc.>")
        await alice.request("bob", "echo", Note(text="x"), Note)
        captured = await wire.next_msg(timeout=WAIT)
        addressed, _ = decode_frame(captured.data)
        other = bob2 if addressed.to_instance == bob.instance else bob
        await assert_refused(
            attacker,
            rpc_subject(other),
            captured.data,
            captured.headers,
            "UNAUTHENTICATED",
            "request addressed to",
        )
        assert seen.calls == [f"{addressed.to_instance}:echo"]
        assert other.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_addressed_to_another_instance_is_refused(
    bob: mesh.Mesh, attacker: NatsClient, mallory: Identity, seen: Seen
) -> None:
    """A well-sealed request whose header names another instance of bob is refused."""
    frame, headers = genuine_request(mallory, bob, ti="0123456789abcdef")
    await assert_refused(
        attacker, rpc_subject(bob), frame, headers, "UNAUTHENTICATED", "request addressed to"
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_request_redirected_to_another_endpoint_is_refused(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A request sealed for ``echo`` delivered on the ``slow`` subject is refused."""
    frame, headers = genuine_request(alice.identity, bob)
    await assert_refused(
        attacker,
        rpc_subject(bob, "slow"),
        frame,
        headers,
        "UNAUTHENTICATED",
        "subject does not match the sealed endpoint",
    )
    assert seen.calls == []
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- size --------------------------------------------------------------------------------------


async def test_oversized_frame_is_refused_before_decoding(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A frame over ``max_body`` plus the envelope overhead is refused as RESOURCE_EXHAUSTED."""
    frame, headers = genuine_request(alice.identity, bob, text="x" * (MAX_BODY + 20 * 1024))
    await assert_refused(
        attacker, rpc_subject(bob), frame, headers, "RESOURCE_EXHAUSTED", "exceeds the limit"
    )
    assert seen.calls == []
    assert bob.stats.refused == {"RESOURCE_EXHAUSTED": 1}


async def test_client_refuses_to_send_oversized_body(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """``request`` raises ``MessageTooLarge`` for a body over ``max_body`` and sends nothing."""
    wire = await tap(attacker, "mesh.rpc.>")
    with pytest.raises(mesh.MessageTooLarge):
        await alice.request("bob", "echo", Note(text="x" * MAX_BODY), Note)
    with pytest.raises(NatsTimeout):
        await wire.next_msg(timeout=0.2)
    assert seen.calls == []


async def test_sealed_body_over_max_body_is_refused_before_decrypting(
    bob: mesh.Mesh, attacker: NatsClient, mallory: Identity, seen: Seen
) -> None:
    """A small header with a body over ``max_body`` (but under the frame limit) is refused."""
    frame, headers = genuine_request(mallory, bob, text="x" * (2 * MAX_BODY))
    await assert_refused(
        attacker, rpc_subject(bob), frame, headers, "RESOURCE_EXHAUSTED", "exceeds the limit"
    )
    assert seen.calls == []


# --- malformed bytes ---------------------------------------------------------------------------


def framed(header_bytes: bytes) -> bytes:
    return PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes


def _reply_kind_frame(frame: bytes) -> bytes:
    fields, sealed = split_frame(frame)
    fields.update(k=Kind.REPLY.value, re=os.urandom(16), st="OK")
    return pack_header(fields) + sealed


MALFORMED = {
    "junk": lambda frame: b"GET / HTTP/1.1\r\nHost: bob\r\n\r\n",
    "empty": lambda frame: b"",
    "prefix-only": lambda frame: frame[: PREFIX.size],
    "truncated-header": lambda frame: frame[:40],
    "bad-magic": lambda frame: b"\x4d\x02" + frame[2:],
    "header-length-past-end": lambda frame: PREFIX.pack(MAGIC, 0xFFFF) + frame[PREFIX.size :],
    "header-not-a-map": lambda frame: framed(msgpack.packb("not a map")) + b"body",
    "reply-kind": _reply_kind_frame,
}


@pytest.mark.parametrize("mangle", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_frame_is_refused_as_invalid_argument(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen, mangle: Any
) -> None:
    """Bytes that are not a well-formed request frame are refused as INVALID_ARGUMENT."""
    frame, headers = genuine_request(alice.identity, bob)
    await assert_refused(attacker, rpc_subject(bob), mangle(frame), headers, "INVALID_ARGUMENT", "")
    assert seen.calls == []
    assert bob.stats.refused == {"INVALID_ARGUMENT": 1}


# --- events ------------------------------------------------------------------------------------


async def test_event_signed_by_another_key_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """An event carrying alice's certificate but signed by the attacker is dropped."""
    forged = event_frame(alice.identity, "news", "forged", signing=SigningKey.generate())
    await inject(attacker, "mesh.evt.alice.news", forged)
    await genuine_event_barrier(alice, seen)
    assert "forged" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_with_tampered_body_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine signed event whose body was changed after signing is dropped."""
    frame = event_frame(alice.identity, "news", "legit")
    tampered = frame.replace(b'"legit"', b'"LEGIT"')
    assert tampered != frame
    await inject(attacker, "mesh.evt.alice.news", tampered)
    await genuine_event_barrier(alice, seen)
    assert "LEGIT" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_claiming_alice_with_attackers_certificate_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, mallory: Identity, seen: Seen
) -> None:
    """A validly signed event from another agent that claims to come from alice is dropped."""
    forged = event_frame(mallory, "news", "forged", from_agent="alice")
    await inject(attacker, "mesh.evt.alice.news", forged)
    await genuine_event_barrier(alice, seen)
    assert "forged" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_from_another_root_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A correctly signed event by an "alice" of another trust root is dropped."""
    forged = event_frame(Trust().identity("alice"), "news", "forged")
    await inject(attacker, "mesh.evt.alice.news", forged)
    await genuine_event_barrier(alice, seen)
    assert "forged" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_replayed_event_never_reaches_handler_twice(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine event captured off the wire and published again is delivered once."""
    wire = await tap(attacker, "mesh.evt.>")
    await alice.publish("news", Note(text="once"))
    captured = await wire.next_msg(timeout=WAIT)
    await inject(attacker, captured.subject, captured.data, headers=captured.headers)
    await genuine_event_barrier(alice, seen, before=1)
    assert seen.events.count("once") == 1
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_republished_on_another_topic_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine ``news`` event republished on the ``alerts`` subject is dropped."""
    frame = event_frame(alice.identity, "news", "moved")
    await inject(attacker, "mesh.evt.alice.alerts", frame)
    await genuine_event_barrier(alice, seen)
    assert "alert:moved" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_with_altered_readable_traceparent_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine event whose readable ``traceparent`` differs from the signed one is dropped."""
    frame = event_frame(alice.identity, "news", "traced", traced=True)
    headers = {
        HDR_TRACEPARENT: "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01",
        HDR_TRACESTATE: TRACESTATE,
    }
    await inject(attacker, "mesh.evt.alice.news", frame, headers=headers)
    await genuine_event_barrier(alice, seen)
    assert "traced" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


async def test_event_with_altered_readable_tracestate_never_reaches_handler(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A genuine event whose readable ``tracestate`` differs from the signed one is dropped."""
    frame = event_frame(alice.identity, "news", "traced", traced=True)
    headers = {HDR_TRACEPARENT: TRACEPARENT, HDR_TRACESTATE: "vendor=forged"}
    await inject(attacker, "mesh.evt.alice.news", frame, headers=headers)
    await genuine_event_barrier(alice, seen)
    assert "traced" not in seen.events
    assert bob.stats.refused == {"UNAUTHENTICATED": 1}


# --- forged replies ----------------------------------------------------------------------------


async def race_reply(
    alice: mesh.Mesh, attacker: NatsClient, seen: Seen, forge: Any, text: str = "slow"
) -> Note:
    """Call bob's slow endpoint while the attacker answers on alice's inbox first.

    ``forge(request_header, reply_subject)`` returns the bytes the attacker publishes; bob's
    handler is released only once the server has taken them, so they reach alice first.
    """
    wire = await tap(attacker, "mesh.rpc.bob.*.slow")

    async def answer_first() -> None:
        try:
            captured = await wire.next_msg(timeout=WAIT)
            request, _ = decode_frame(captured.data)
            await inject(attacker, captured.reply, forge(request, captured.reply))
        finally:
            seen.gate.set()

    task = asyncio.create_task(answer_first())
    try:
        return await alice.request("bob", "slow", Note(text=text), Note)
    finally:
        await task


def refusal_frame(reply_to: bytes) -> bytes:
    """An unsealed REFUSAL as ``Mesh._refuse`` writes it, claiming PERMISSION_DENIED."""
    header = Header(
        kind=Kind.REFUSAL,
        id=os.urandom(16),
        ts=int(time.time() * 1000),
        reply_to=reply_to,
        status="PERMISSION_DENIED",
        message="forged",
        rule="attacker",
    )
    return encode_frame(header)[0]


async def next_frame(sub: Any, kind: Kind) -> bytes:
    """The next message on ``sub`` that is a frame of ``kind`` (inboxes also carry KV traffic)."""
    while True:
        data = (await sub.next_msg(timeout=WAIT)).data
        try:
            header, _ = decode_frame(data)
        except mesh.DecodeError:
            continue
        if header.kind == kind:
            return data


def reply_fields(request: Header, **overrides: Any) -> dict[str, Any]:
    """A reply header as ``Mesh._send_reply`` writes it, answering ``request``."""
    fields: dict[str, Any] = {
        "k": Kind.REPLY.value,
        "id": os.urandom(16),
        "ts": int(time.time() * 1000),
        "fa": request.to_agent,
        "fi": request.to_instance,
        "ta": request.from_agent,
        "ti": request.from_instance,
        "re": request.id,
        "st": "OK",
        "sq": 0,
        "end": True,
    }
    fields.update(overrides)
    return fields


async def test_junk_reply_on_callers_inbox_is_ignored(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """Junk published on alice's reply inbox before bob answers is dropped."""
    answer = await race_reply(alice, attacker, seen, lambda request, reply: b"\x4d\x01junk")
    assert answer.text == "bob:slow"
    assert alice.stats.dropped_replies == 1


async def test_wrongly_sealed_reply_on_callers_inbox_is_ignored(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A well-addressed REPLY sealed with a key that is not the pair key is dropped."""

    def forge(request: Header, reply: str) -> bytes:
        return seal(reply_fields(request), os.urandom(32), b'{"text":"forged"}')

    answer = await race_reply(alice, attacker, seen, forge)
    assert answer.text == "bob:slow"
    assert alice.stats.dropped_replies == 1


async def test_genuine_reply_to_another_request_is_ignored(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """Bob's sealed reply to an earlier request, replayed on a later request's inbox, is dropped."""
    inbox_tap = await tap(attacker, "_INBOX.>")
    await alice.request("bob", "echo", Note(text="first"), Note)
    old_reply = await next_frame(inbox_tap, Kind.REPLY)
    await inbox_tap.unsubscribe()
    answer = await race_reply(alice, attacker, seen, lambda request, reply: old_reply)
    assert answer.text == "bob:slow"
    assert alice.stats.dropped_replies == 1


async def test_forged_refusal_cannot_forge_a_successful_answer(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A forged REFUSAL neither forges an answer nor fails the call (protocol §13): the caller
    keeps waiting and gets bob's reply; the handler ran once."""

    def forge(request: Header, reply: str) -> bytes:
        return refusal_frame(request.id)

    answer = await race_reply(alice, attacker, seen, forge)
    assert answer.text == "bob:slow"
    assert seen.calls == [f"{bob.instance}:slow"]


async def test_refusal_with_zero_request_id_is_ignored(
    bob: mesh.Mesh, alice: mesh.Mesh, attacker: NatsClient, seen: Seen
) -> None:
    """A REFUSAL answering no request in particular (zero ``re``) does not fail a pending call."""
    answer = await race_reply(
        alice, attacker, seen, lambda request, reply: refusal_frame(bytes(16))
    )
    assert answer.text == "bob:slow"


# --- directory ---------------------------------------------------------------------------------


async def test_poisoned_directory_record_does_not_stop_the_directory_watch(
    nats_server: Any, trust: Trust, attacker: NatsClient
) -> None:
    """After a copy of bob's record with a truncated signature is put, new agents are still seen."""
    cfg = test_config([nats_server.url])
    async with contextlib.AsyncExitStack() as stack:

        async def join(identity: Identity, agent: Agent | None = None) -> mesh.Mesh:
            m = mesh.Mesh(identity, cfg, agent=agent)
            stack.push_async_callback(m.transport.close)  # even if drain fails on the bug
            return await stack.enter_async_context(m)

        bob = await join(trust.identity("bob"), victim_agent(Seen()))
        alice = await join(trust.identity("alice"))
        await alice.wait_for("bob")
        kv = await attacker.jetstream().key_value(alice.bucket)
        entry = await kv.get(f"bob.{bob.instance}")
        body, signature = msgpack.unpackb(entry.value)
        await kv.put(f"bob.{bob.instance}", msgpack.packb([body, signature[:63]]))
        carol = trust.identity("carol")
        record = encode_record(
            carol.keys.signing,
            carol.certificate,
            endpoints=[EndpointInfo("echo")],
            version="1",
            labels={},
            ts=time.time(),
        )
        await kv.put(f"carol.{carol.instance}", record)
        await alice.wait_for("carol", timeout=1.5)
