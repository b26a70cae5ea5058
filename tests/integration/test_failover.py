"""Instances that die or drain under load: no keyed request is lost (each is answered, or
refused with the honest "outcome unknown" of its claim, never run twice), no drained request
fails."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import mesh
from mesh.testing import NatsServer, Trust, test_config, wait_until

from .workers import Done, Job

REPO = Path(__file__).resolve().parents[2]
MESH_AGENT = str(Path(sys.executable).parent / "mesh-agent")


def spawn_worker(url: str, identity_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MESH_SERVERS": url,
        "MESH_IDENTITY": str(identity_dir),
        "MESH_DRAIN_TIMEOUT": "5s",
        "MESH_ALLOW_NO_POLICY": "1",  # no registry in this mesh
    }
    return subprocess.Popen(
        [MESH_AGENT, "run", "tests.integration.workers:worker", "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def workers(
    nats_server: NatsServer, trust: Trust, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    for i in range(2):
        d = tmp_path / f"worker-{i}"
        mesh.save_identity(trust.identity("worker"), d)
        procs.append(spawn_worker(nats_server.url, d))
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stderr is not None:
            p.stderr.close()


async def run_load(
    alice: mesh.Mesh, n: int, *, keyed: bool, on_progress: int, action: asyncio.Event
) -> list[Done | mesh.FailedPrecondition]:
    sem = asyncio.Semaphore(16)
    done = 0

    async def one(i: int) -> Done | mesh.FailedPrecondition:
        nonlocal done
        async with sem:
            try:
                reply: Done | mesh.FailedPrecondition = await alice.request(
                    "worker",
                    "work",
                    Job(key=f"k{i}", work_ms=20),
                    Done,
                    timeout=10,
                    idempotency_key=f"k{i}" if keyed else None,
                )
            except mesh.FailedPrecondition as exc:
                # A keyed call whose instance died while running it (its claim has no
                # outcome): refused honestly rather than run again (docs/protocol.md §17).
                if not keyed or "outcome unknown" not in exc.message:
                    raise
                reply = exc
        done += 1
        if done == on_progress:
            action.set()
        return reply

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_sigkill_of_one_instance_loses_no_keyed_request(
    nats_server: NatsServer, trust: Trust, workers: list[subprocess.Popen[bytes]]
) -> None:
    """Killing one of two instances mid-load: every keyed request is answered (by the survivor
    if it had not reached the victim's handler), or refused as "outcome unknown"."""
    cfg = test_config([nats_server.url])
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        await wait_until(lambda: len(alice.directory.instances("worker")) == 2, timeout=20)
        halfway = asyncio.Event()
        load = asyncio.create_task(
            run_load(alice, 400, keyed=True, on_progress=100, action=halfway)
        )
        await halfway.wait()
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        replies = await load
        retried = alice.stats.fates.get("ok_after_retry", 0)
    answered = [r for r in replies if isinstance(r, Done)]
    unknown = [i for i, r in enumerate(replies) if not isinstance(r, Done)]
    assert sorted([r.key for r in answered] + [f"k{i}" for i in unknown]) == sorted(
        f"k{i}" for i in range(400)
    )
    by_instance = Counter(r.instance for r in answered)
    assert len(by_instance) == 2, "both instances served before the kill"
    assert victim.wait(5) == -signal.SIGKILL
    # Requests caught at the victim were retried on the survivor (they had not reached its
    # handler) or refused as "outcome unknown" (they had): none ran twice.
    assert retried + len(unknown) >= 1


async def test_sigterm_drains_without_failing_unkeyed_requests(
    nats_server: NatsServer, trust: Trust, workers: list[subprocess.Popen[bytes]]
) -> None:
    """A draining instance finishes its in-flight work; callers see no failure, even unkeyed."""
    cfg = test_config([nats_server.url])
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        await wait_until(lambda: len(alice.directory.instances("worker")) == 2, timeout=20)
        halfway = asyncio.Event()
        load = asyncio.create_task(
            run_load(alice, 400, keyed=False, on_progress=100, action=halfway)
        )
        await halfway.wait()
        workers[0].send_signal(signal.SIGTERM)
        replies = await load
        assert len(replies) == 400 and all(isinstance(r, Done) for r in replies)
        assert workers[0].wait(10) == 0
        await wait_until(lambda: len(alice.directory.instances("worker")) == 1)
