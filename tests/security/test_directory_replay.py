"""Directory records replayed by a broker-level attacker: refused, by their signed time.

The attack: once an instance is dead and callers have forgotten it, put its last genuinely
signed record back under its key. Judged by arrival, the copy looked fresh; holding the dead
instance's subject, the attacker then swallowed every call until its deadline. Now a record is
as fresh as its signed ``ts`` (allowing ``max_skew``), and a reader remembers the last ``ts``
of every instance for as long as a record could still pass that age check, refusing one that
is not newer. A restarted instance (same identity, later clock) is accepted as before.

The unit tests drive ``Directory`` with a fake clock; the last test is a plain nats-py
attacker against a real nats-server, a SIGKILLed instance and its restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import nats
import pytest
from nats.aio.msg import Msg

import mesh
from mesh import Agent, Identity
from mesh._core.identity import CertificateVerifier
from mesh._core.records import STATE_DRAINING, EndpointInfo, decode_record, encode_record
from mesh._runtime.directory import Directory, _Watch
from mesh._runtime.governance import Governance
from mesh._runtime.registration import Registration
from mesh.testing import FakeClock, NatsServer, Trust, test_config, wait_until

NOW = 1_800_000_000.0
TTL = 4.0
SKEW = 5.0

REPO = Path(__file__).resolve().parents[2]
MESH_AGENT = str(Path(sys.executable).parent / "mesh-agent")


async def _no_watch(keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
    return
    yield  # an async generator that yields nothing


def directory(trust: Trust, clock: FakeClock, max_floors: int = 65_536) -> Directory:
    verifier = CertificateVerifier(trust.root.public_key, clock=clock)
    d = Directory(_no_watch, verifier, ttl=TTL, clock=clock, max_skew=SKEW, max_floors=max_floors)
    d._all = _Watch(None)  # fed by hand through _apply: stands for a watch of every agent
    return d


def record(identity: Identity, ts: float, state: str = "serving") -> bytes:
    return encode_record(
        identity.keys.signing,
        identity.certificate,
        endpoints=[EndpointInfo("work")],
        version="1",
        labels={},
        ts=ts,
        state=state,
    )


def key(identity: Identity) -> str:
    return f"{identity.agent}.{identity.instance}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def bob(trust: Trust) -> Identity:
    return trust.identity("bob", now=NOW - 60)


# --- the reader's rules ----------------------------------------------------------------------


def test_replay_of_a_forgotten_instance_is_refused(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """The last record of an instance swept as dead, put again, is refused and never listed."""
    d = directory(trust, clock)
    last = record(bob, NOW)
    d._apply(key(bob), last)
    assert d.instances("bob")

    clock.advance(TTL + 0.5)
    d._sweep_once()
    assert d.get(key(bob)) is None and d.is_gone(key(bob))

    d._apply(key(bob), last)  # the attacker re-puts it

    assert d.refused["replayed"] == 1
    assert d.get(key(bob)) is None
    assert d.is_gone(key(bob))
    assert not d.instances("bob")


def test_older_record_of_a_live_instance_is_refused(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A record older than the one held is counted as replayed and changes nothing."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW - 1))
    d._apply(key(bob), record(bob, NOW, STATE_DRAINING))

    d._apply(key(bob), record(bob, NOW - 1))  # serving again, says the old copy

    assert d.refused["replayed"] == 1
    assert d.is_gone(key(bob))
    assert not d.instances("bob")


def test_same_record_delivered_again_is_not_counted(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A new watch re-delivers the record held: ignored quietly, it is no evidence of life."""
    d = directory(trust, clock)
    raw = record(bob, NOW)
    d._apply(key(bob), raw)
    clock.advance(TTL - 1)

    d._apply(key(bob), raw)

    assert not d.refused
    clock.advance(1.5)
    assert not d.instances("bob"), "the copy did not extend its life"


def test_record_older_than_ttl_and_skew_is_refused(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """Even a reader that never saw the instance refuses a record dead by its signed time."""
    d = directory(trust, clock)

    d._apply(key(bob), record(bob, NOW - TTL - SKEW - 0.01))

    assert d.refused["stale"] == 1
    assert d.get(key(bob)) is None


def test_liveness_comes_from_the_signed_time(trust: Trust, clock: FakeClock, bob: Identity) -> None:
    """A record older than the skew allows lives only until ``ts + skew + ttl``."""
    d = directory(trust, clock)
    ts = NOW - SKEW - 2

    d._apply(key(bob), record(bob, ts))

    assert d.instances("bob")
    clock.now = ts + SKEW + TTL + 0.01
    assert not d.instances("bob")
    assert d.is_gone(key(bob))


def test_writer_within_the_skew_is_judged_by_arrival(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A writer whose clock is behind by less than the skew lives a whole ``ttl``."""
    d = directory(trust, clock)

    d._apply(key(bob), record(bob, NOW - SKEW + 0.5))

    clock.advance(TTL - 0.01)
    assert d.instances("bob")


def test_record_dated_beyond_the_skew_is_refused(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A record dated more than ``max_skew`` ahead is refused."""
    d = directory(trust, clock)

    d._apply(key(bob), record(bob, NOW + SKEW + 0.01))

    assert d.refused["future"] == 1
    assert d.get(key(bob)) is None


def test_restarted_instance_is_accepted(trust: Trust, clock: FakeClock, bob: Identity) -> None:
    """The same identity writing again after its death (a later ``ts``) is listed again."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(TTL + 0.5)
    d._sweep_once()

    d._apply(key(bob), record(bob, clock.now))

    assert not d.refused
    assert [r.instance for r in d.instances("bob")] == [bob.instance]


def test_memory_of_last_times_is_bounded(trust: Trust, clock: FakeClock) -> None:
    """Past ``max_floors`` instances the oldest is folded into a floor for all: its replay is
    still refused."""
    d = directory(trust, clock, max_floors=2)
    ids = [trust.identity(f"a{i}", now=NOW - 60) for i in range(3)]
    first = record(ids[0], NOW - 1)
    d._apply(key(ids[0]), first)
    for i, identity in enumerate(ids[1:]):
        d._apply(key(identity), record(identity, NOW + i / 10))
    clock.advance(TTL + 0.5)
    d._sweep_once()

    d._apply(key(ids[0]), first)

    assert len(d._floors) <= 2
    assert d.refused["replayed"] == 1
    assert d.get(key(ids[0])) is None


def test_floors_are_forgotten_once_the_age_check_covers_them(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """The memory of a dead instance is dropped once any record it could refuse is stale."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(TTL + SKEW + 0.01)

    d._sweep_once()

    assert not d._floors


def test_records_of_one_writer_have_strictly_rising_times(
    trust: Trust, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two records signed in the same millisecond (a heartbeat, then draining) differ in ``ts``
    so that the second is not taken for a replay of the first."""
    identity = trust.identity("bob")
    governance = cast(Governance, SimpleNamespace(revision=None, error=None, stale=None))
    registration = Registration(Agent("bob"), lambda: identity, governance, heartbeat=1.0)
    monkeypatch.setattr("mesh._runtime.registration.time.time", lambda: NOW)
    verifier = CertificateVerifier(trust.root.public_key)

    first = decode_record(registration.record(), verifier)
    second = decode_record(registration.record(STATE_DRAINING), verifier)

    assert second.ts > first.ts
    assert round(second.ts * 1000) == round(first.ts * 1000) + 1


# --- the attack on a real broker ---------------------------------------------------------------


def spawn_worker(url: str, identity_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MESH_SERVERS": url,
        "MESH_IDENTITY": str(identity_dir),
        "MESH_ALLOW_NO_POLICY": "1",
    }
    return subprocess.Popen(
        [MESH_AGENT, "run", "tests.integration.workers:worker", "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for p in running:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.mark.integration
async def test_replayed_record_of_a_killed_instance_neither_lists_nor_blackholes_it(
    nats_server: NatsServer, trust: Trust, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A SIGKILLed instance's last record, re-put once callers forgot it, is refused: calls fail
    over to the live instance, or fail fast when there is none, and never reach the attacker
    holding the dead subject; the same instance restarted is accepted."""
    from tests.integration.workers import Done, Job, worker

    cfg = test_config([nats_server.url])
    victim = trust.identity("worker")
    victim_dir = tmp_path / "victim"
    mesh.save_identity(victim, victim_dir)
    victim_key = key(victim)
    attacker = await nats.connect(nats_server.url)
    blackholed: list[Msg] = []

    async def swallow(msg: Msg) -> None:
        blackholed.append(msg)

    try:
        async with mesh.Mesh(trust.identity("alice"), cfg) as alice:
            async with mesh.Mesh(trust.identity("worker"), cfg, agent=worker) as survivor:
                procs.append(spawn_worker(nats_server.url, victim_dir))
                await wait_until(lambda: len(alice.directory.instances("worker")) == 2, timeout=20)

                procs[0].send_signal(signal.SIGKILL)
                assert procs[0].wait(10) == -signal.SIGKILL
                kv = await attacker.jetstream().key_value(alice.bucket)
                captured = (await kv.get(victim_key)).value  # its last genuinely signed record
                assert captured is not None
                await wait_until(lambda: alice.directory.get(victim_key) is None, timeout=10)

                subject = f"{cfg.prefix}.rpc.worker.{victim.instance}.*"
                await attacker.subscribe(subject, cb=swallow)
                await attacker.flush()
                await kv.put(victim_key, captured)
                await wait_until(lambda: alice.directory.refused["replayed"] == 1)

                assert alice.directory.get(victim_key) is None
                assert alice.directory.is_gone(victim_key)
                for i in range(5):  # fails over: every call is answered by the survivor
                    job = Job(key=f"k{i}")
                    done = await alice.request("worker", "work", job, Done, timeout=5)
                    assert done.instance == survivor.instance

            # The survivor drained: the attacker's copy is all the bucket holds of "worker".
            await kv.put(victim_key, captured)
            await wait_until(lambda: alice.directory.refused["replayed"] == 2)
            await fails_fast(alice)

            # A reader that never saw the victim refuses the copy once its signed time is
            # older than ttl + skew (before that it is a heartbeat as good as any).
            ts = decode_record(captured, alice.verifier).ts
            await asyncio.sleep(max(0.0, ts + cfg.directory.ttl + SKEW + 0.2 - time.time()))
            await kv.put(victim_key, captured)
            async with mesh.Mesh(trust.identity("alice"), cfg) as carol:
                await carol.directory.watch_agent("worker", 5)  # what a first call does
                assert carol.directory.refused["stale"] >= 1
                await fails_fast(carol)
                assert not blackholed, "a call reached the attacker holding the dead subject"

                # The same instance restarted (the attacker, still subscribed, sees its calls).
                procs.append(spawn_worker(nats_server.url, victim_dir))
                for m in (alice, carol):
                    await wait_until(partial(listed, m, "worker"), timeout=20)
                    done = await m.request("worker", "work", Job(key="back"), Done, timeout=5)
                    assert done.instance == victim.instance
    finally:
        await attacker.close()


def listed(caller: mesh.Mesh, agent: str) -> bool:
    return bool(caller.directory.instances(agent))


async def fails_fast(caller: mesh.Mesh) -> None:
    """A call to "worker" fails at once: no instance of it is listed."""
    from tests.integration.workers import Done, Job

    assert not caller.directory.instances("worker")
    started = time.monotonic()
    with pytest.raises(mesh.MeshError):
        await caller.request("worker", "work", Job(key="lost"), Done, timeout=5)
    assert time.monotonic() - started < 2.0, "the call waited for the blackhole"
