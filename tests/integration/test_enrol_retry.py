"""``mesh-agent run --token`` while the registry is not up yet: it retries enrolment with
backoff (``agent.enrol_retry``), enrols once a registry answers and serves; a refused token
ends it at once; ``--enrol-timeout`` bounds the wait; Ctrl-C stops it at once. The runner is a
subprocess against a real nats-server; the registry runs in this process."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import mesh
from mesh.cli.agent import enrolment_keys
from mesh.control_plane import TokenReply, TokenRequest, TrustRoot, save_trust_root
from mesh.testing import NatsServer, test_config
from mesh_agents import registry as reg

from .cli_helpers import base_env
from .test_runner import AGENT_SOURCE, Runner

pytestmark = pytest.mark.integration


@dataclass
class Scene:
    """A nats-server, a trust root (``keys/root.pub``) and a user's project (``app/agent.py``,
    the agent ``pinger``); the registry is started by the test, when it wants."""

    nats: NatsServer
    root: TrustRoot
    keys: Path
    project: Path
    cfg: mesh.MeshConfig

    def env(self) -> dict[str, str]:
        return base_env(servers=self.nats.url)

    async def runner(self, token: str, *extra: str) -> Runner:
        return await Runner.start(
            "run", "app/agent.py:agent",
            "--token", token,
            "--identity", self.project / "id",
            "--root", self.keys / "root.pub",
            "--connect-timeout", "1s",
            *extra,
            env=self.env(), cwd=self.project,
        )  # fmt: skip

    @asynccontextmanager
    async def registry(self) -> AsyncIterator[mesh.Mesh]:
        """The registry and an admin, up until the block ends; yields the admin."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                mesh.Mesh(
                    self.root.issue_identity("registry", roles=["registry"]),
                    self.cfg,
                    agent=reg.registry,
                    trust_root=self.root,
                )
            )
            admin = await stack.enter_async_context(
                mesh.Mesh(self.root.issue_identity("admin", roles=["admin"]), self.cfg)
            )
            await admin.wait_for("registry")
            yield admin

    async def token(self, agent: str = "pinger") -> str:
        """A join token for ``agent``, made by a registry that is gone again when it returns
        (its drain deregisters it: the directory lists no registry)."""
        async with self.registry() as admin:
            reply = await admin.request("registry", "token", TokenRequest(agent=agent), TokenReply)
            return reply.token


@pytest.fixture
def scene(nats_server: NatsServer, tmp_path: Path) -> Scene:
    root = TrustRoot.generate()
    keys = save_trust_root(root, tmp_path / "keys")
    project = tmp_path / "project"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text("")
    (project / "app" / "helpers.py").write_text('VERSION = "1.0.0"\n')
    (project / "app" / "agent.py").write_text(AGENT_SOURCE)
    return Scene(nats_server, root, keys, project, test_config([nats_server.url]))


def events(runner: Runner, kind: str) -> list[dict[str, object]]:
    found = []
    for line in runner.lines:
        with_event = line.strip()
        if with_event.startswith("{"):
            record = json.loads(with_event)
            if record.get("event") == kind:
                found.append(record)
    return found


async def test_enrolment_waits_for_the_registry_then_serves(scene: Scene) -> None:
    """Started before any registry, the runner logs ``agent.enrol_retry`` (reason, next
    delay); once a registry is up it enrols, saves its identity (no pending keys left) and
    serves, listed in the directory, within a few seconds."""
    token = await scene.token()
    runner = await scene.runner(token)
    try:
        await runner.wait_for('"agent.enrol_retry"', times=2)
        retry = events(runner, "agent.enrol_retry")[0]
        assert "no live instance of agent 'registry'" in str(retry["reason"]), retry
        assert 0.5 <= float(str(retry["retry_in"])) <= 1.0, retry  # the first: 1 s, jittered
        pending = scene.project / "id" / "enrolment.key"
        assert stat.S_IMODE(pending.stat().st_mode) == 0o600
        async with scene.registry() as admin:
            t0 = time.monotonic()
            await runner.wait_for('"agent.ready"', timeout=15)
            await admin.wait_for("pinger", timeout=5)
            took = time.monotonic() - t0
            assert took < 8, f"enrolled {took:.1f}s after the registry started"
            assert len(events(runner, "agent.enrolled")) == 1
            assert (scene.project / "id" / "identity.cert").exists()
            assert not pending.exists()
            code, _ = await runner.interrupt(signal.SIGTERM)
            assert code == 0, runner.text
    finally:
        await runner.close()


async def test_a_restart_presents_the_saved_keys_and_gets_the_redeemed_token(
    scene: Scene,
) -> None:
    """A run that saved its keys and had the token redeemed, but died before the reply: the
    next run presents the same keys and the registry delivers the same certificate again."""
    token = await scene.token()
    keys = enrolment_keys(scene.project / "id")  # what the first run saved, then it died
    async with scene.registry() as admin:
        first = await mesh.enrol(
            scene.cfg, agent="pinger", token=token, root_public_key=scene.root.public_key,
            keys=keys, timeout=10,
        )  # fmt: skip
        runner = await scene.runner(token)
        try:
            await runner.wait_for('"agent.ready"', timeout=15)
            await admin.wait_for("pinger", timeout=5)
        finally:
            await runner.close()
    saved = mesh.load_identity(scene.project / "id")
    assert saved.certificate.serial == first.certificate.serial
    assert saved.keys.sign_pk == keys.sign_pk


async def test_a_refused_token_ends_enrolment_at_once(scene: Scene) -> None:
    """An unknown token, or one made for another agent, exits 2 at once with the registry's
    reason, without a retry."""
    other = await scene.token("somebody")
    async with scene.registry():
        for token, reason in (
            ("mjt_not-a-token", "unknown join token"),
            (other, "for another agent"),
        ):
            runner = await scene.runner(token)
            try:
                t0 = time.monotonic()
                code = await asyncio.wait_for(runner.proc.wait(), 20)
                await runner._reader
                took = time.monotonic() - t0
            finally:
                await runner.close()
            assert code == 2, runner.text
            assert "Unauthenticated:" in runner.text and reason in runner.text, runner.text
            assert events(runner, "agent.enrol_retry") == [], runner.text
            assert took < 8, f"took {took:.1f}s"


async def test_enrol_timeout_bounds_the_wait(scene: Scene) -> None:
    """With no registry, ``--enrol-timeout 3s`` gives up after about 3 s, exit 2, saying
    what it waited for."""
    runner = await scene.runner("mjt_whatever", "--enrol-timeout", "3s")
    try:
        await runner.wait_for('"agent.enrol_retry"', timeout=15)
        t0 = time.monotonic()  # the process is up: interpreter start-up does not count
        code = await asyncio.wait_for(runner.proc.wait(), 20)
        await runner._reader
        took = time.monotonic() - t0
    finally:
        await runner.close()
    assert code == 2, runner.text
    assert "Unavailable: could not enrol 'pinger' within 3s (--enrol-timeout)" in runner.text
    assert "the last: UNAVAILABLE: no live instance of agent 'registry'" in runner.text
    assert took < 4, f"exited {took:.1f}s after the first retry"


async def test_ctrl_c_stops_a_retrying_enrolment_at_once(scene: Scene) -> None:
    """SIGINT while it waits for a registry exits 130 at once, without a traceback."""
    runner = await scene.runner("mjt_whatever")
    try:
        await runner.wait_for('"agent.enrol_retry"', timeout=15)
        code, took = await runner.interrupt(signal.SIGINT)
    finally:
        await runner.close()
    assert code == 130, runner.text
    assert took < 2, f"took {took:.1f}s"
    assert "Traceback" not in runner.text
    assert events(runner, "agent.interrupted")[0]["phase"] == "enrolling"


async def test_an_unreachable_nats_is_retried_too(scene: Scene, tmp_path: Path) -> None:
    """With nothing listening at ``--servers``, the reason is NATS being unreachable, and
    the enrolment is retried until its bound."""
    runner = await Runner.start(
        "run", "app/agent.py:agent",
        "--token", "mjt_whatever",
        "--identity", tmp_path / "id",
        "--root", scene.keys / "root.pub",
        "--servers", "nats://127.0.0.1:1",
        "--enrol-timeout", "2s",
        env=scene.env(), cwd=scene.project,
    )  # fmt: skip
    try:
        code = await asyncio.wait_for(runner.proc.wait(), 20)
        await runner._reader
    finally:
        await runner.close()
    assert code == 2, runner.text
    retries = events(runner, "agent.enrol_retry")
    assert retries and all("UNAVAILABLE" in str(r["reason"]) for r in retries), runner.text
    assert "could not enrol 'pinger' within 2s" in runner.text
