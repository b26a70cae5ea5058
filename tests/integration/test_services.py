"""The NATS services protocol (ADR-32): mesh agents answer $SRV PING, INFO and STATS on a real
nats-server, as a plain nats-py client sees them, valid against the jsm.go schemas."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from jsonschema import Draft7Validator
from nats.aio.client import Client
from nats.micro.service import EndpointStats, ServiceInfo, ServicePing, ServiceStats
from pydantic import BaseModel

import mesh
from mesh._core.schemas import publish_schemas
from mesh._runtime.services import semver
from mesh.testing import NatsServer, Trust, test_config, wait_until

SCHEMAS = Path(__file__).parent / "schemas"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6,9}Z")


def validator(name: str) -> Draft7Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, format_checker=Draft7Validator.FORMAT_CHECKER)


PING = validator("ping_response")
INFO = validator("info_response")
STATS = validator("stats_response")


def valid(v: Draft7Validator, doc: dict[str, Any]) -> dict[str, Any]:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    assert not errors, errors
    return doc


class Num(BaseModel):
    a: int
    b: int = 0


class Sum(BaseModel):
    total: int


class Note(BaseModel):
    text: str


def make_calc() -> mesh.Agent:
    calc = mesh.Agent("calc", version="1.2", labels={"team": "maths"}, description="adds numbers")

    @calc.endpoint(idempotent=True, concurrency=4)
    async def add(n: Num) -> Sum:
        return Sum(total=n.a + n.b)

    @calc.endpoint()
    async def neg(n: Num) -> Sum:
        return Sum(total=-n.a)

    return calc


def make_notes() -> mesh.Agent:
    notes = mesh.Agent("notes", version="2.0.1-beta.1")

    @notes.endpoint()
    async def save(n: Note) -> Note:
        if n.text == "bad":
            raise mesh.InvalidArgument("refusing a bad note")
        return n

    return notes


@dataclass
class World:
    calcs: list[mesh.Mesh]
    notes: mesh.Mesh
    client: mesh.Mesh
    nc: Client


@pytest.fixture
async def world(nats_server: NatsServer, trust: Trust) -> AsyncIterator[World]:
    cfg = test_config([nats_server.url])
    async with (
        mesh.Mesh(trust.identity("calc"), cfg, agent=make_calc()) as calc1,
        mesh.Mesh(trust.identity("calc"), cfg, agent=make_calc()) as calc2,
        mesh.Mesh(trust.identity("notes"), cfg, agent=make_notes()) as notes,
        mesh.Mesh(trust.identity("alice", roles=["coordinator"]), cfg) as client,
    ):
        for m in (calc1, calc2, notes, client):
            await m.transport.flush()
        await client.wait_for("calc")
        await client.wait_for("notes")
        await wait_until(lambda: len(client.directory.instances("calc")) == 2)
        nc = await nats.connect(nats_server.url)
        try:
            yield World([calc1, calc2], notes, client, nc)
        finally:
            await nc.close()


async def collect(nc: Client, subject: str, wait: float = 0.3) -> list[dict[str, Any]]:
    """Publish one request and gather every reply that arrives within ``wait`` seconds."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        end = asyncio.get_running_loop().time() + wait
        while (left := end - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            status = (msg.headers or {}).get("Status")
            if status == "503" and not msg.data:
                break  # "no responders": nobody serves this subject
            assert status is None, msg.headers
            replies.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return replies


async def send_traffic(client: mesh.Mesh) -> None:
    for i in range(5):
        assert (await client.request("calc", "add", Num(a=i, b=1), Sum)).total == i + 1
    assert (await client.request("calc", "neg", Num(a=3), Sum)).total == -3
    for text in ("one", "two"):
        await client.request("notes", "save", Note(text=text), Note)
    with pytest.raises(mesh.InvalidArgument):
        await client.request("notes", "save", Note(text="bad"), Note)


async def test_ping_lists_every_agent_instance(world: World) -> None:
    """$SRV.PING reaches every serving instance (not the caller-only client), each once."""
    replies = await collect(world.nc, "$SRV.PING")
    for doc in replies:
        valid(PING, doc)
        ServicePing.from_dict(doc)  # what nats.py's own client parses
    got = sorted((d["name"], d["id"]) for d in replies)
    want = sorted([("calc", m.instance) for m in world.calcs] + [("notes", world.notes.instance)])
    assert got == want
    by_name = {d["name"]: d for d in replies}
    assert by_name["calc"]["version"] == "1.2.0"  # "1.2" mapped to semver
    assert by_name["notes"]["version"] == "2.0.1-beta.1"
    assert by_name["calc"]["metadata"] == {
        "team": "maths",
        "mesh.prefix": "mesh",
        "mesh.kind": "agent",
    }
    assert by_name["notes"]["metadata"] == {"mesh.prefix": "mesh", "mesh.kind": "agent"}

    only_notes = await collect(world.nc, "$SRV.PING.notes")
    assert [d["id"] for d in only_notes] == [world.notes.instance]
    one = world.calcs[1]
    assert [d["id"] for d in await collect(world.nc, f"$SRV.PING.calc.{one.instance}")] == [
        one.instance
    ]
    assert await collect(world.nc, "$SRV.PING.nobody", wait=0.2) == []


async def test_info_describes_endpoints_on_instance_subjects(world: World) -> None:
    replies = await collect(world.nc, "$SRV.INFO.calc")
    assert sorted(d["id"] for d in replies) == sorted(m.instance for m in world.calcs)
    for doc in replies:
        valid(INFO, doc)
        ServiceInfo.from_dict(doc)
        assert doc["description"] == "adds numbers"
        assert doc["metadata"]["mesh.kind"] == "agent"
        prefix = f"mesh.rpc.calc.{doc['id']}"
        published = publish_schemas(Num, Sum)
        assert published is not None
        schema = {"request": published.input, "response": published.output}
        assert doc["endpoints"] == [
            {
                "name": "add",
                "subject": f"{prefix}.add",
                "queue_group": "",
                "metadata": {
                    "idempotent": "true",
                    "streams": "false",
                    "concurrency": "4",
                    "schema": published.hash,
                },
                "schema": schema,
            },
            {
                "name": "neg",
                "subject": f"{prefix}.neg",
                "queue_group": "",
                "metadata": {
                    "idempotent": "false",
                    "streams": "false",
                    "concurrency": "64",
                    "schema": published.hash,
                },
                "schema": schema,
            },
        ]
        # What ADR-32's first revision put in `schema` (strings), for the tools that read it.
        assert json.loads(published.input) == Num.model_json_schema()
        assert json.loads(published.output) == Sum.model_json_schema(mode="serialization")

    (notes,) = await collect(world.nc, f"$SRV.INFO.notes.{world.notes.instance}")
    valid(INFO, notes)
    assert notes["description"] == "mesh agent notes"  # the default when none is declared
    assert [e["name"] for e in notes["endpoints"]] == ["save"]

    everyone = await collect(world.nc, "$SRV.INFO")
    for doc in everyone:
        valid(INFO, doc)
    assert len(everyone) == 3


async def test_stats_count_requests_and_errors(world: World) -> None:
    """STATS counters match the traffic sent: 6 to calc (over two instances), 3 to notes of
    which 1 failed."""
    await send_traffic(world.client)

    calc_totals: dict[str, int] = {"add": 0, "neg": 0}
    before = datetime.now(UTC)
    for m in world.calcs:
        (doc,) = await collect(world.nc, f"$SRV.STATS.calc.{m.instance}")
        valid(STATS, doc)
        ServiceStats.from_dict(doc)
        assert (doc["name"], doc["id"], doc["version"]) == ("calc", m.instance, "1.2.0")
        assert RFC3339_UTC.fullmatch(doc["started"]), doc["started"]
        started = datetime.strptime(doc["started"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before - timedelta(seconds=60) < started <= before
        assert abs(started.timestamp() - m.started_at) < 1e-5
        for ep in doc["endpoints"]:
            EndpointStats.from_dict(ep)
            assert ep["subject"] == f"mesh.rpc.calc.{m.instance}.{ep['name']}"
            assert ep["queue_group"] == ""
            assert ep["num_errors"] == 0 and ep["last_error"] == ""
            assert isinstance(ep["processing_time"], int)
            n = ep["num_requests"]
            assert ep["average_processing_time"] == (ep["processing_time"] // n if n else 0)
            assert ep["data"] == {"replayed_from_cache": 0}
            calc_totals[ep["name"]] += n
    assert calc_totals == {"add": 5, "neg": 1}

    (notes,) = await collect(world.nc, f"$SRV.STATS.notes.{world.notes.instance}")
    valid(STATS, notes)
    (save,) = notes["endpoints"]
    assert (save["num_requests"], save["num_errors"]) == (3, 1)
    assert save["last_error"] == "INVALID_ARGUMENT"
    assert save["processing_time"] > 0
    assert save["average_processing_time"] == save["processing_time"] // 3

    by_name = await collect(world.nc, "$SRV.STATS.calc")
    assert sorted(d["id"] for d in by_name) == sorted(m.instance for m in world.calcs)
    assert sum(e["num_requests"] for d in by_name for e in d["endpoints"]) == 6
    for doc in await collect(world.nc, "$SRV.STATS"):
        valid(STATS, doc)


async def test_no_reply_into_mesh_subjects(world: World) -> None:
    """A reply subject inside the mesh's prefix gets nothing: discovery JSON is never reflected
    onto the mesh's own subjects."""
    sub = await world.nc.subscribe("mesh.evt.calc.spoof")
    await world.nc.publish("$SRV.PING", b"", reply="mesh.evt.calc.spoof")
    await world.nc.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)


async def test_stops_answering_after_drain(world: World) -> None:
    gone = world.calcs[0]
    await gone.drain()
    replies = await collect(world.nc, "$SRV.PING.calc")
    assert [d["id"] for d in replies] == [world.calcs[1].instance]


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("1.2.3", "1.2.3"),
        ("1.0.0-rc.1+build.5", "1.0.0-rc.1+build.5"),
        ("1.2", "1.2.0"),
        ("v3", "3.0.0"),
        ("01.2.3", "1.2.3"),
        ("latest", "0.0.0"),
        ("", "0.0.0"),
        ("1.2.3\n", "0.0.0"),
        ("\u0661.2.3", "0.0.0"),  # an Arabic-Indic digit is not a semver digit
    ],
)
def test_semver(given: str, want: str) -> None:
    assert semver(given) == want
