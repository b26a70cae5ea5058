"""Published endpoint schemas on a real nats-server: fetched from `$SRV` INFO and verified
against the signed directory record (``Mesh.schemas``, ``mesh-policy schemas``), a forged INFO
reply detected, and callers that pin a schema refusing an instance that changed it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from pydantic import BaseModel, Field

import mesh
from mesh._core.schemas import publish_schemas
from mesh._runtime.services import info_response
from mesh.testing import NatsServer, Trust, test_config, wait_until

from .cli_helpers import base_env, run


class Question(BaseModel):
    text: str = Field(min_length=1, max_length=100)


class LongQuestion(BaseModel):  # the same endpoint after a change: longer questions
    text: str = Field(min_length=1, max_length=2000)


class Answer(BaseModel):
    text: str
    sources: list[str] = []


class Word(BaseModel):
    index: int
    text: str


def make_oracle(longer: bool = False) -> mesh.Agent:
    """The oracle; with ``longer``, its ``ask`` endpoint changed to take longer questions."""
    oracle = mesh.Agent("oracle", version="1.0.0")
    if longer:

        @oracle.endpoint(idempotent=True)
        async def ask(q: LongQuestion) -> Answer:
            return Answer(text=q.text.upper())

    else:

        @oracle.endpoint(idempotent=True, name="ask")
        async def ask_short(q: Question) -> Answer:
            return Answer(text=q.text.upper())

    @oracle.endpoint
    async def spell(q: Question) -> AsyncIterator[Word]:
        for i, word in enumerate(q.text.split()):
            yield Word(index=i, text=word)

    @oracle.endpoint
    async def forget(q: Question) -> None:
        return None

    return oracle


async def test_schemas_are_fetched_verified_and_match_the_models(
    nats_server: NatsServer, trust: Trust
) -> None:
    """`Mesh.schemas` returns each endpoint's input and output schemas as pydantic makes them
    (the chunk model's for a streaming endpoint, null for none), with the record's hash and
    flags."""
    cfg = test_config([nats_server.url])
    oracle = make_oracle()
    async with (
        mesh.Mesh(trust.identity("oracle"), cfg, agent=oracle),
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        schemas = await alice.schemas("oracle", timeout=5)

        (record,) = alice.directory.instances("oracle")
    assert set(schemas) == {"ask", "spell", "forget"}
    ask, spell, forget = schemas["ask"], schemas["spell"], schemas["forget"]
    assert ask.input == Question.model_json_schema()
    assert ask.output == Answer.model_json_schema(mode="serialization")
    assert (ask.idempotent, ask.streams) == (True, False)
    assert spell.output == Word.model_json_schema(mode="serialization")
    assert (spell.idempotent, spell.streams) == (False, True)
    assert forget.output == {"type": "null"}
    assert ask.input is not None and ask.input["properties"]["text"]["maxLength"] == 100
    for name, s in schemas.items():
        assert s == oracle.schemas()[name]
        assert s.hash == record.endpoints[name].schema


async def test_schemas_cli_prints_them_verified(
    nats_server: NatsServer, trust: Trust, tmp_path: Path
) -> None:
    """`mesh-policy schemas AGENT --json` prints the schemas and hashes; the table names the
    hashes to pin; an agent nobody serves exits 2 without a traceback."""
    cfg = test_config([nats_server.url])
    mesh.save_identity(trust.identity("admin", roles=["admin"]), tmp_path / "admin")
    env = base_env(servers=nats_server.url, identity=tmp_path / "admin")
    oracle = make_oracle()
    async with mesh.Mesh(trust.identity("oracle"), cfg, agent=oracle):
        as_json, as_table, nobody = (
            await run("mesh-policy", "schemas", "oracle", "--json", env=env),
            await run("mesh-policy", "schemas", "oracle", env=env),
            await run("mesh-policy", "schemas", "nobody", "--timeout", "1s", env=env),
        )
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["agent"] == "oracle"
    assert list(doc["endpoints"]) == ["ask", "forget", "spell"]
    expected = oracle.schemas()
    for name, got in doc["endpoints"].items():
        assert got == {k: v for k, v in expected[name].document().items() if k != "name"}
    assert as_table.returncode == 0, as_table.stderr
    assert expected["ask"].hash is not None and expected["ask"].hash in as_table.stdout
    assert "--pin oracle.ENDPOINT=HASH" in as_table.stdout
    assert nobody.returncode == 2
    last = nobody.stderr.strip().splitlines()[-1]
    assert last == "Unavailable: no live instance of agent 'nobody' in the directory", last
    assert "Traceback" not in nobody.stderr


def altered_info(doc: dict[str, Any]) -> dict[str, Any]:
    """An INFO reply with the `ask` endpoint's input schema changed: 100 characters become
    100 000, as a broker that wants to pass off a looser contract would."""
    forged: dict[str, Any] = json.loads(json.dumps(doc))
    for endpoint in forged["endpoints"]:
        if endpoint["name"] == "ask":
            request = json.loads(endpoint["schema"]["request"])
            request["properties"]["text"]["maxLength"] = 100_000
            endpoint["schema"]["request"] = json.dumps(request)
    return forged


async def test_a_forged_info_reply_is_detected(nats_server: NatsServer, trust: Trust) -> None:
    """A plain NATS client answering `$SRV.INFO.oracle.<instance>` with altered schemas (the
    instance itself does not answer) fails `Mesh.schemas` with Unauthenticated naming the
    agent, the instance and the endpoint."""
    cfg = test_config([nats_server.url])
    quiet = test_config([nats_server.url], services=False)
    async with (
        mesh.Mesh(trust.identity("oracle"), quiet, agent=make_oracle()) as oracle,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        forged = altered_info(info_response(oracle))  # what the instance would say, altered
        nc = await nats.connect(nats_server.url)
        try:

            async def lie(msg: Msg) -> None:
                await msg.respond(json.dumps(forged).encode())

            await nc.subscribe(f"$SRV.INFO.oracle.{oracle.instance}", cb=lie)
            await nc.flush()
            await alice.wait_for("oracle")
            with pytest.raises(mesh.Unauthenticated) as caught:
                await alice.schemas("oracle", timeout=5)
        finally:
            await nc.close()
    message = caught.value.message
    assert message.startswith(
        f"the schemas served by oracle instance {oracle.instance} do not match its signed "
        "directory record: the broker or the instance altered them (endpoint 'ask': they hash "
        "to sha256:"
    ), message


async def test_a_forger_cannot_hide_the_true_schemas(nats_server: NatsServer, trust: Trust) -> None:
    """With the instance answering too, a forged reply changes nothing: the schemas are
    content-addressed, so the reply that matches the signed record is the one taken."""
    cfg = test_config([nats_server.url])
    oracle = make_oracle()
    async with (
        mesh.Mesh(trust.identity("oracle"), cfg, agent=oracle) as serving,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        forged = altered_info(info_response(serving))
        nc = await nats.connect(nats_server.url)
        try:

            async def lie(msg: Msg) -> None:
                await msg.respond(json.dumps(forged).encode())

            await nc.subscribe(f"$SRV.INFO.oracle.{serving.instance}", cb=lie)
            await nc.flush()
            for _ in range(3):
                schemas = await alice.schemas("oracle", timeout=5)
                assert schemas["ask"] == oracle.schemas()["ask"]
        finally:
            await nc.close()


async def test_an_instance_without_services_has_nothing_to_fetch(
    nats_server: NatsServer, trust: Trust
) -> None:
    """With `MeshConfig(services=False)` nobody answers INFO: Unavailable at once, saying so."""
    cfg = test_config([nats_server.url])
    quiet = test_config([nats_server.url], services=False)
    async with (
        mesh.Mesh(trust.identity("oracle"), quiet, agent=make_oracle()) as oracle,
        mesh.Mesh(trust.identity("alice"), cfg) as alice,
    ):
        with pytest.raises(mesh.Unavailable, match=r"does not answer \$SRV\.INFO") as caught:
            await alice.schemas("oracle", timeout=5)
    assert oracle.instance in caught.value.message


async def test_a_pinned_caller_refuses_a_changed_schema_until_re_pinned(
    nats_server: NatsServer, trust: Trust
) -> None:
    """A caller pinning `oracle.ask` calls it while the record announces the pinned hash; once
    the agent restarts with a changed model, the call fails before anything is sent with
    FailedPrecondition naming both hashes and how to re-pin; a caller pinned to the new hash
    calls it again."""
    old = publish_schemas(Question, Answer)
    new = publish_schemas(LongQuestion, Answer)
    assert old is not None and new is not None and old.hash != new.hash
    base = test_config([nats_server.url])
    pinned = test_config([nats_server.url], schema_pins={"oracle.ask": old.hash})
    identity = trust.identity("oracle")  # the same instance, restarted with new code
    async with mesh.Mesh(trust.identity("alice"), pinned) as alice:
        async with mesh.Mesh(identity, base, agent=make_oracle()):
            await alice.wait_for("oracle")
            answer = await alice.request("oracle", "ask", Question(text="hi"), Answer)
            assert answer.text == "HI"

        async with mesh.Mesh(identity, base, agent=make_oracle(longer=True)) as restarted:
            await wait_until(
                lambda: (
                    [r.endpoints["ask"].schema for r in alice.directory.instances("oracle")]
                    == [new.hash]
                ),
                timeout=10,
            )
            spy = await nats.connect(nats_server.url)  # sees every request to the oracle
            seen: list[str] = []

            async def note(msg: Msg) -> None:
                seen.append(msg.subject)

            await spy.subscribe("mesh.rpc.oracle.>", cb=note)
            await spy.flush()
            with pytest.raises(mesh.FailedPrecondition) as caught:
                await alice.request("oracle", "ask", Question(text="hi"), Answer)
            await alice.transport.flush()
            await spy.flush()
            assert seen == []  # refused before anything was sent
            assert restarted.endpoint_stats["ask"].requests == 0
            # Other endpoints are not pinned: they are called as before.
            assert await alice.request_json("oracle", "forget", {"text": "hi"}) is None

            repinned = test_config([nats_server.url], schema_pins={"oracle.ask": new.hash})
            async with mesh.Mesh(trust.identity("alice"), repinned) as alice_again:
                await alice_again.wait_for("oracle")
                answer = await alice_again.request(
                    "oracle", "ask", LongQuestion(text="x" * 500), Answer
                )
                assert answer.text == "X" * 500
            await wait_until(lambda: len(seen) == 2)
            await spy.close()
            assert seen == [f"mesh.rpc.oracle.{identity.instance}.{e}" for e in ("forget", "ask")]
    message = caught.value.message
    assert old.hash in message and new.hash in message
    assert f"instance oracle.{identity.instance} announces {new.hash}" in message
    assert f"--pin oracle.ask={new.hash}" in message
    assert "mesh-policy schemas oracle" in message
