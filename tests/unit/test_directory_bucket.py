"""``DirectoryBucket``: a deleted directory bucket is re-created (in-memory transport)."""

from __future__ import annotations

import logging

import pytest

from mesh._runtime.directory import DirectoryBucket
from mesh._transport.memory import MemoryTransport


async def test_recover_is_a_no_op_while_the_bucket_exists() -> None:
    transport = MemoryTransport()
    bucket = DirectoryBucket(transport, "mesh-directory", ttl=10.0, replicas=1)
    kv = await bucket.open()
    assert await bucket.recover() is False
    assert await bucket.open() is kv
    assert bucket.generation == 0


async def test_a_deleted_bucket_is_recreated_once_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh")
    transport = MemoryTransport()
    bucket = DirectoryBucket(transport, "mesh-directory", ttl=10.0, replicas=1)
    old = await bucket.open()
    del transport.broker.kvs["mesh-directory"]  # what an attacker's delete_key_value does
    assert await bucket.recover() is True
    new = await bucket.open()
    assert new is not old
    assert transport.broker.kvs["mesh-directory"] is new
    assert bucket.generation == 1
    assert await bucket.recover() is False
    assert caplog.text.count("mesh.directory_recreated") == 1


async def test_a_bucket_another_process_recreated_is_opened_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh")
    broker = MemoryTransport.new_broker()
    mine = DirectoryBucket(MemoryTransport(broker), "mesh-directory", ttl=10.0, replicas=1)
    theirs = DirectoryBucket(MemoryTransport(broker), "mesh-directory", ttl=10.0, replicas=1)
    await mine.open()
    await theirs.open()
    del broker.kvs["mesh-directory"]
    assert await theirs.recover() is True
    assert await mine.recover() is True  # a new incarnation: watch it
    assert await mine.open() is await theirs.open()
    assert caplog.text.count("mesh.directory_recreated") == 1
