"""A broker-level attacker deletes the directory bucket: the mesh re-creates it and recovers.

The attacker is a plain nats-py client with JetStream rights. Deleting ``mesh-directory``
must not leave every call failing until restarts: the instances re-create the bucket,
re-announce themselves, and the callers watch the new bucket, keeping the records they knew
meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats
import pytest
from pydantic import BaseModel

import mesh
from mesh import Agent
from mesh._core.records import decode_record
from mesh.testing import NatsServer, Trust, test_config, wait_until

pytestmark = pytest.mark.integration

WAIT = 5.0


class Note(BaseModel):
    text: str


def echo_bob() -> Agent:
    bob = Agent("bob")

    @bob.endpoint
    async def echo(note: Note) -> Note:
        return Note(text=f"bob:{note.text}")

    return bob


async def call_within(alice: mesh.Mesh, text: str, seconds: float) -> Note:
    """The first successful ``bob.echo`` call within ``seconds`` (calls may fail meanwhile)."""
    end = time.monotonic() + seconds
    while True:
        try:
            return await alice.request("bob", "echo", Note(text=text), Note, timeout=1.0)
        except mesh.MeshError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def test_deleted_directory_bucket_is_recreated_and_calls_recover(
    nats_server: NatsServer, trust: Trust, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh")
    cfg = test_config([nats_server.url])
    attacker = await nats.connect(nats_server.url)
    try:
        js = attacker.jetstream()
        async with (
            mesh.Mesh(trust.identity("bob"), cfg, agent=echo_bob()) as bob,
            mesh.Mesh(trust.identity("alice"), cfg) as alice,
        ):
            await alice.wait_for("bob", timeout=WAIT)
            assert (await call_within(alice, "before", WAIT)).text == "bob:before"

            assert await js.delete_key_value("mesh-directory")

            # The instance known before stays usable while the bucket is being re-created.
            assert alice.directory.get(f"bob.{bob.instance}") is not None
            assert (await call_within(alice, "after", WAIT)).text == "bob:after"

            async def bob_listed() -> bool:
                try:
                    kv = await js.key_value("mesh-directory")
                    entry = await kv.get(f"bob.{bob.instance}")
                except Exception:
                    return False
                assert entry.value is not None
                return decode_record(entry.value, bob.verifier).instance == bob.instance

            end = time.monotonic() + WAIT
            while not await bob_listed():
                assert time.monotonic() < end, "the bucket was not re-created with bob's record"
                await asyncio.sleep(0.1)

            # The caller's watch follows the new bucket: bob's heartbeats keep him live there
            # for longer than the TTL.
            await asyncio.sleep(cfg.directory.ttl * 2)
            assert alice.directory.instances("bob")
            assert (await call_within(alice, "later", 1.0)).text == "bob:later"
            await wait_until(lambda: "mesh.directory_recreated" in caplog.text, timeout=WAIT)
    finally:
        await attacker.close()
