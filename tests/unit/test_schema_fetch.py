"""Fetching published schemas and checking them against the signed record (``Mesh.schemas``),
and schema pins refusing a call before it is sent, over ``MemoryTransport``: every lie an
INFO reply can tell, and the replies that are not the one asked for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, Field

import mesh
from mesh import Agent, Mesh
from mesh._core.identity import CertificateVerifier
from mesh._core.records import EndpointInfo, decode_record, encode_record
from mesh._core.schemas import schema_hash
from mesh._runtime.schemas import INFO_GRACE, _NotTheReply, fetch_schemas, verify_info
from mesh._runtime.services import info_response
from mesh.testing import MemoryTransport, Trust, test_config


class Question(BaseModel):
    text: str = Field(max_length=100)


class Answer(BaseModel):
    text: str


def _oracle() -> Agent:
    oracle = Agent("oracle")

    @oracle.endpoint(idempotent=True)
    async def ask(q: Question) -> Answer:
        return Answer(text=q.text)

    @oracle.endpoint
    async def tell(q: Question) -> None:
        return None

    return oracle


@contextlib.asynccontextmanager
async def _world(
    trust: Trust, *, pins: dict[str, str] | None = None, services: bool = True
) -> AsyncIterator[tuple[Mesh, Mesh, MemoryTransport]]:
    broker = MemoryTransport.new_broker()
    cfg = test_config(["mem://"], services=services)
    pinned = test_config(["mem://"], schema_pins=pins or {})
    async with (
        Mesh(
            trust.identity("oracle"), cfg, agent=_oracle(), transport=MemoryTransport(broker)
        ) as o,
        Mesh(trust.identity("alice"), pinned, transport=MemoryTransport(broker)) as alice,
    ):
        liar = MemoryTransport(broker)
        await liar.connect()
        await alice.wait_for("oracle")
        yield o, alice, liar


def _forged(doc: dict[str, Any], max_length: int = 5) -> bytes:
    forged = json.loads(json.dumps(doc))
    ask = next(e for e in forged["endpoints"] if e["name"] == "ask")
    request = json.loads(ask["schema"]["request"])
    request["properties"]["text"]["maxLength"] = max_length
    ask["schema"]["request"] = json.dumps(request, indent=1)  # any layout: it is re-canonicalized
    return json.dumps(forged).encode()


async def _answer(liar: MemoryTransport, subject: str, reply: bytes, delay: float = 0.0) -> None:
    async def respond(msg: Any) -> None:
        await asyncio.sleep(delay)
        await liar.publish(msg.reply, reply)

    await liar.subscribe(subject, respond)


# --- Mesh.schemas ----------------------------------------------------------------------------


async def test_schemas_fetched_and_verified(trust: Trust) -> None:
    """The schemas of every endpoint, as the agent declares them."""
    async with _world(trust) as (_oracle_mesh, alice, _):
        schemas = await alice.schemas("oracle", timeout=2)

    assert schemas == _oracle().schemas()
    assert schemas["ask"].input == Question.model_json_schema()


async def test_a_forged_reply_alone_is_refused_naming_the_endpoint(trust: Trust) -> None:
    """Only a forger answers: Unauthenticated, naming the endpoint whose hash differs."""
    async with _world(trust, services=False) as (oracle, alice, liar):
        subject = f"$SRV.INFO.oracle.{oracle.instance}"
        await _answer(liar, subject, _forged(info_response(oracle)))

        with pytest.raises(mesh.Unauthenticated, match="endpoint 'ask': they hash to"):
            await alice.schemas("oracle", timeout=2)


async def test_a_forged_reply_first_then_the_true_one_is_taken(trust: Trust) -> None:
    """The forger answers at once, the instance within the grace: the true schemas win."""
    async with _world(trust, services=False) as (oracle, alice, liar):
        subject = f"$SRV.INFO.oracle.{oracle.instance}"
        await _answer(liar, subject, _forged(info_response(oracle)))
        true = json.dumps(info_response(oracle)).encode()
        await _answer(liar, subject, true, delay=INFO_GRACE / 3)

        schemas = await alice.schemas("oracle", timeout=2)

    assert schemas == _oracle().schemas()


async def test_replies_that_are_not_the_instances_are_ignored(trust: Trust) -> None:
    """Junk, another instance's or agent's reply, a PING reply: ignored; then time is up."""
    async with _world(trust, services=False) as (oracle, alice, liar):
        subject = f"$SRV.INFO.oracle.{oracle.instance}"
        doc = info_response(oracle)
        for reply in (
            b"not json",
            json.dumps([1]).encode(),
            json.dumps({**doc, "id": "someone-else"}).encode(),
            json.dumps({**doc, "name": "other"}).encode(),
            json.dumps({**doc, "type": "io.nats.micro.v1.ping_response"}).encode(),
        ):
            await _answer(liar, subject, reply)
        started = time.monotonic()

        with pytest.raises(mesh.Unavailable, match=r"did not answer \$SRV\.INFO within"):
            await alice.schemas("oracle", timeout=0.5)
    assert time.monotonic() - started < 2


async def test_no_info_responder_is_unavailable_at_once(trust: Trust) -> None:
    """Nobody answers INFO (services off): Unavailable from the no-responders status, at once."""
    async with _world(trust, services=False) as (_oracle_mesh, alice, _):
        started = time.monotonic()
        with pytest.raises(mesh.Unavailable, match=r"MeshConfig\.services is off"):
            await alice.schemas("oracle", timeout=5)
    assert time.monotonic() - started < 1


async def test_fetch_needs_a_live_instance() -> None:
    """Without a live instance there is nobody to ask."""
    with pytest.raises(mesh.Unavailable, match="no live instance of agent 'x'"):
        await fetch_schemas(MemoryTransport(), "x", [], time.monotonic() + 1)


# --- verify_info -----------------------------------------------------------------------------


def _record(trust: Trust, endpoints: list[EndpointInfo]) -> Any:
    ident = trust.identity("oracle")
    raw = encode_record(
        ident.keys.signing, ident.certificate, endpoints=endpoints, version="1", labels={}, ts=1
    )
    return decode_record(raw, CertificateVerifier(trust.root.public_key))


def _info(record: Any, endpoints: list[dict[str, Any]]) -> bytes:
    doc = {
        "type": "io.nats.micro.v1.info_response",
        "name": record.agent,
        "id": record.instance,
        "endpoints": endpoints,
    }
    return json.dumps(doc).encode()


def _entry(name: str, request: Any = '{"type":"object"}', response: Any = '{"type":"null"}') -> Any:
    return {"name": name, "schema": {"request": request, "response": response}}


HASH = schema_hash({"type": "object"}, {"type": "null"})


@pytest.mark.parametrize(
    ("endpoints", "problem"),
    [
        ([], "not in the reply"),
        ([{"name": "e"}], "no schema"),
        ([{"name": "e", "schema": "x"}], "no schema"),
        ([_entry("e", request={"type": "object"})], "no schema"),
        ([_entry("e", request="{")], "a schema is not JSON"),
        ([_entry("e", request='{"a": NaN}')], "a schema is not JSON"),
        ([_entry("e", request='{"type":"string"}')], "they hash to sha256:"),
        ([_entry("e"), _entry("e")], "listed twice"),
    ],
)
def test_every_lie_is_unauthenticated(
    trust: Trust, endpoints: list[dict[str, Any]], problem: str
) -> None:
    """Missing, malformed, altered or repeated schemas: Unauthenticated, saying which."""
    record = _record(trust, [EndpointInfo("e", schema=HASH)])

    with pytest.raises(mesh.Unauthenticated, match=f"endpoint 'e': {problem}"):
        verify_info(_info(record, endpoints), record)


def test_the_truth_in_any_layout_is_accepted(trust: Trust) -> None:
    """Schemas that hash to the record's in any JSON layout are accepted; an endpoint the
    record has no hash for is unpublished; endpoints the record does not list are ignored."""
    record = _record(trust, [EndpointInfo("e", True, schema=HASH), EndpointInfo("old")])
    spaced = _entry("e", request='{ "type" : "object" }', response='{"type":   "null"}')

    got = verify_info(_info(record, [spaced, {"name": "extra"}]), record)

    assert set(got) == {"e", "old"}  # the record's endpoints, not what the reply adds
    assert got["e"] == mesh.EndpointSchema(
        "e", {"type": "object"}, {"type": "null"}, HASH, False, True
    )
    assert got["old"] == mesh.EndpointSchema("old", None, None, None)  # nothing signed: unpublished


def test_schemas_must_be_objects(trust: Trust) -> None:
    """A schema that matches its hash but is not a JSON object is refused all the same."""
    digest = schema_hash([], {"type": "null"})
    record = _record(trust, [EndpointInfo("e", schema=digest)])

    with pytest.raises(mesh.Unauthenticated, match="not a JSON object"):
        verify_info(_info(record, [_entry("e", request="[]")]), record)


@pytest.mark.parametrize("data", [b"", b"[]", b'{"type": "io.nats.micro.v1.info_response"}'])
def test_not_the_reply(trust: Trust, data: bytes) -> None:
    """Not JSON, not an object, not the INFO reply of this agent and instance: not the reply."""
    record = _record(trust, [])
    with pytest.raises(_NotTheReply):
        verify_info(data, record)


# --- pins ------------------------------------------------------------------------------------


async def test_a_pin_that_matches_is_called_and_one_that_does_not_is_refused(
    trust: Trust,
) -> None:
    """The pin is checked against the record of the instance picked, before sending."""
    good = _oracle().schemas()["ask"].hash
    assert good is not None
    async with _world(trust, pins={"oracle.ask": good}) as (_, alice, _liar):
        assert (await alice.request("oracle", "ask", Question(text="a"), Answer)).text == "a"
    bad = "sha256:" + "0" * 64
    async with _world(trust, pins={"oracle.ask": bad}) as (oracle, alice, _liar):
        with pytest.raises(mesh.FailedPrecondition, match=f"pinned to schema {bad}, but"):
            await alice.request("oracle", "ask", Question(text="a"), Answer)
        assert await alice.request_json("oracle", "tell", {"text": "a"}) is None  # not pinned
        assert oracle.endpoint_stats["ask"].requests == 0
