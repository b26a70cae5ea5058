"""Exactly once per idempotency key across instances: SIGKILL of one of two instances under
keyed non-idempotent load executes no key twice, and every call gets an answer or an honest
error."""

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

from .claim_workers import Charge, Receipt

REPO = Path(__file__).resolve().parents[2]
MESH_AGENT = str(Path(sys.executable).parent / "mesh-agent")
CALLS = 300


def spawn_ledger(url: str, identity_dir: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MESH_SERVERS": url,
        "MESH_IDENTITY": str(identity_dir),
        "MESH_DRAIN_TIMEOUT": "5s",
        "MESH_ALLOW_NO_POLICY": "1",  # no registry in this mesh
        "LEDGER_LOG_DIR": str(log_dir),
    }
    return subprocess.Popen(
        [MESH_AGENT, "run", "tests.integration.claim_workers:ledger", "--log-level", "error"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "executions"
    d.mkdir()
    return d


@pytest.fixture
def ledgers(
    nats_server: NatsServer, trust: Trust, tmp_path: Path, log_dir: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    for i in range(2):
        d = tmp_path / f"ledger-{i}"
        mesh.save_identity(trust.identity("ledger"), d)
        procs.append(spawn_ledger(nats_server.url, d, log_dir))
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def executions(log_dir: Path) -> dict[str, Counter[str]]:
    """Keys executed, by process id."""
    return {f.stem: Counter(f.read_text().split()) for f in sorted(log_dir.glob("*.log"))}


async def test_sigkill_under_keyed_load_executes_no_key_twice(
    nats_server: NatsServer,
    trust: Trust,
    ledgers: list[subprocess.Popen[bytes]],
    log_dir: Path,
) -> None:
    """Kill one of two instances mid-load: 0 keys executed twice; every call is answered
    with its one execution's receipt or with the honest "outcome unknown" error."""
    cfg = test_config([nats_server.url])
    async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
        await wait_until(lambda: len(alice.directory.instances("ledger")) == 2, timeout=30)
        halfway = asyncio.Event()
        sem = asyncio.Semaphore(16)
        done = 0

        async def one(i: int) -> Receipt:
            nonlocal done
            async with sem:
                reply = await alice.request(
                    "ledger", "charge", Charge(key=f"k{i}", work_ms=200), Receipt,
                    timeout=20, idempotency_key=f"k{i}",
                )  # fmt: skip
            done += 1
            if done == 100:
                halfway.set()
            return reply

        load = asyncio.gather(*(one(i) for i in range(CALLS)), return_exceptions=True)
        await halfway.wait()
        # Replies come in waves (every handler sleeps as long): kill half-way into one, so
        # that the victim dies with handlers running and claims without an outcome.
        await asyncio.sleep(0.1)
        victim = ledgers[0]
        victim.send_signal(signal.SIGKILL)
        results = await load
        fates = dict(alice.stats.fates)
    assert victim.wait(5) == -signal.SIGKILL
    by_process = executions(log_dir)
    total: Counter[str] = Counter()
    for counts in by_process.values():
        total.update(counts)
    twice = sorted(k for k, n in total.items() if n > 1)
    assert twice == [], f"keys executed twice: {twice}"
    assert len(by_process) == 2, "both instances executed calls"
    honest = []
    for i, result in enumerate(results):
        key = f"k{i}"
        if isinstance(result, Receipt):
            assert result.key == key and total[key] == 1
        else:
            assert isinstance(result, mesh.FailedPrecondition), repr(result)
            assert "outcome unknown" in result.message and "may have run" in result.message
            honest.append(key)
    survivor = next(c for pid, c in by_process.items() if int(pid) != victim.pid)
    assert not any(survivor[k] for k in honest), "an honest error's key ran on the survivor"
    print(
        f"\nclaims failover: {CALLS - len(honest)} receipts, {len(honest)} honest errors, "
        f"executions by process {[sum(c.values()) for c in by_process.values()]}, fates {fates}"
    )
