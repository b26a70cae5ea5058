"""Signed beats over core NATS: liveness that does not depend on the KV watch, and cannot be
forged, replayed or used to bring a dead instance back.

Anyone on NATS can publish on ``<p>.beat.>``. A beat counts only if it verifies with the key of
the directory record the reader already holds for that instance, is newer than the last beat
accepted for it, and passes the same age and future checks as a record. The unit tests drive
``Directory`` with a fake clock, as ``test_directory_replay.py`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import Identity
from mesh._core.beats import BEAT_CONTEXT, decode_beat, encode_beat
from mesh._core.identity import CertificateVerifier
from mesh._core.records import EndpointInfo, InstanceRecord, encode_record
from mesh._runtime.directory import Directory, _Watch
from mesh.errors import DecodeError, Unauthenticated
from mesh.testing import FakeClock, Trust

NOW = 1_800_000_000.0
TTL = 4.0
SKEW = 5.0


async def _no_watch(keys: str = ">") -> AsyncIterator[tuple[str, bytes | None] | None]:
    return
    yield  # an async generator that yields nothing


def directory(
    trust: Trust,
    clock: FakeClock,
    reconnected: list[str] | None = None,
    heard: list[tuple[str, float]] | None = None,
) -> Directory:
    def on_reconnected(record: InstanceRecord) -> None:
        if reconnected is not None:
            reconnected.append(record.key)

    def on_heard(key: str, ts: float) -> None:
        if heard is not None:
            heard.append((key, ts))

    verifier = CertificateVerifier(trust.root.public_key, clock=clock)
    d = Directory(
        _no_watch,
        verifier,
        ttl=TTL,
        clock=clock,
        max_skew=SKEW,
        on_reconnected=on_reconnected,
        on_heard=on_heard,
    )
    d._all = _Watch(None)  # fed by hand through _apply: stands for a watch of every agent
    return d


def record(identity: Identity, ts: float) -> bytes:
    return encode_record(
        identity.keys.signing,
        identity.certificate,
        endpoints=[EndpointInfo("work")],
        version="1",
        labels={},
        ts=ts,
    )


def beat(
    identity: Identity,
    ts: float,
    up: int = 1,
    signer: Identity | None = None,
    prefix: str = "mesh",
) -> bytes:
    keys = (signer or identity).keys
    return encode_beat(
        keys.signing, prefix, identity.agent, identity.instance, round(ts * 1000), up
    )


def key(identity: Identity) -> str:
    return f"{identity.agent}.{identity.instance}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def bob(trust: Trust) -> Identity:
    return trust.identity("bob", now=NOW - 60)


def test_beats_keep_a_known_instance_alive_without_records(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """With the KV watch silent, signed beats alone keep the instance listed and not gone."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    for i in range(1, 9):
        clock.advance(1.5)
        assert d.accept_beat(beat(bob, NOW + 1.5 * i))
        d._sweep_once()
    assert d.instances("bob") and not d.is_gone(key(bob))

    clock.advance(TTL + 0.5)  # the beats stop: swept like a record that stopped
    d._sweep_once()
    assert d.is_gone(key(bob)) and not d.instances("bob")


def test_a_forged_beat_is_refused(trust: Trust, clock: FakeClock, bob: Identity) -> None:
    """A beat signed by anyone but the instance (here another certified instance) is refused and
    does not keep the instance alive."""
    mallory = trust.identity("mallory", now=NOW - 60)
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(TTL - 0.5)

    assert not d.accept_beat(beat(bob, clock.now, signer=mallory))

    assert d.refused["beat_forged"] == 1
    clock.advance(1.0)
    assert d.is_gone(key(bob))


def test_a_beat_cannot_resurrect_a_swept_instance(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """Once an instance is swept, even its own genuine (held back) beat brings nothing back:
    a beat introduces no instance, only a new signed record does."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    held_back = beat(bob, NOW + 1)
    clock.advance(TTL + 0.5)
    d._sweep_once()

    assert not d.accept_beat(held_back)

    assert d.is_gone(key(bob)) and not d.instances("bob")


def test_a_replayed_beat_is_refused(trust: Trust, clock: FakeClock, bob: Identity) -> None:
    """A beat not newer than the last one accepted is no evidence of life."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    old = beat(bob, NOW + 1.5)
    clock.advance(1.5)
    assert d.accept_beat(old)
    clock.advance(1.5)
    assert d.accept_beat(beat(bob, NOW + 3))
    clock.advance(TTL - 0.5)

    assert not d.accept_beat(old)

    assert d.refused["beat_replayed"] == 1
    clock.advance(1.0)
    assert d.is_gone(key(bob))


def test_beats_dated_ahead_or_too_old_are_refused(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """The age and future checks of records apply to beats."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))

    assert not d.accept_beat(beat(bob, NOW + SKEW + 1))
    assert not d.accept_beat(beat(bob, NOW - TTL - SKEW - 1))

    assert d.refused["beat_future"] == 1 and d.refused["beat_stale"] == 1


def test_a_beat_from_another_mesh_is_refused(trust: Trust, clock: FakeClock, bob: Identity) -> None:
    """A genuine beat of an identity that serves two meshes on one broker, copied from the
    other mesh's subject, is refused: it says nothing about the instance's life in this one."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(TTL - 0.5)

    assert not d.accept_beat(beat(bob, clock.now, prefix="mesh2"))

    assert d.refused["beat_misfiled"] == 1
    clock.advance(1.0)
    assert d.is_gone(key(bob))


def test_a_beat_held_back_is_worth_its_signature_time(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A genuine beat delivered late counts as heard at ``ts + skew`` at most, like a record."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    late = beat(bob, NOW + 0.5)
    clock.advance(SKEW + TTL - 1.0)

    assert d.accept_beat(late)

    assert not d.is_gone(key(bob))  # heard at NOW + 0.5 + SKEW, not at its arrival
    clock.advance(1.6)  # NOW + 0.5 + SKEW + TTL has passed
    assert d.is_gone(key(bob))


def test_a_new_epoch_reports_the_instance_reconnected(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """A beat whose connection epoch changed reports the instance (its in-flight requests may
    be lost); the first beat heard and beats of the same epoch do not."""
    reconnected: list[str] = []
    d = directory(trust, clock, reconnected=reconnected)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(1.5)
    assert d.accept_beat(beat(bob, NOW + 1.5, up=1))
    clock.advance(1.5)
    assert d.accept_beat(beat(bob, NOW + 3, up=1))
    assert reconnected == []
    assert d.accept_beat(beat(bob, NOW + 3.1, up=2))  # fresh, but a new epoch: checked
    assert reconnected == [key(bob)]


def test_a_beat_bringing_no_news_is_not_verified(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """Heard from moments ago in the same epoch, a beat is ignored before its signature is
    checked (no cost, no effect), even a forged one."""
    mallory = trust.identity("mallory", now=NOW - 60)
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(1.5)
    assert d.accept_beat(beat(bob, NOW + 1.5))
    clock.advance(0.5)

    assert not d.accept_beat(beat(bob, NOW + 2, signer=mallory))
    assert not d.accept_beat(beat(bob, NOW + 2))

    assert d.refused["beat_forged"] == 0
    clock.advance(TTL - 0.1)
    assert d.is_gone(key(bob))


def test_records_and_beats_report_fresh_evidence(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """Every record or beat accepted is reported with its signed time (it lifts penalties)."""
    heard: list[tuple[str, float]] = []
    d = directory(trust, clock, heard=heard)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(1.5)
    d.accept_beat(beat(bob, NOW + 1.5, up=2))
    d.accept_beat(beat(bob, NOW + 1.5, up=3))  # replayed: not reported
    assert heard == [(key(bob), NOW), (key(bob), NOW + 1.5)]


def test_deafness_is_not_held_against_instances(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """While the connection is down nobody is swept; after it is back, the instances alive
    when it was lost have ``ttl`` left minus what they had used, and are swept after that."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(1.0)
    d.deaf()
    clock.advance(3 * TTL)
    d._sweep_once()
    assert d.instances("bob") and not d.is_gone(key(bob))

    d.hear()
    clock.advance(TTL - 1.5)
    d._sweep_once()
    assert d.instances("bob")
    clock.advance(1.0)
    d._sweep_once()
    assert d.is_gone(key(bob)) and not d.instances("bob")


def test_deafness_does_not_revive_an_instance_dead_before(
    trust: Trust, clock: FakeClock, bob: Identity
) -> None:
    """An instance already dead when the connection was lost gets no time back."""
    d = directory(trust, clock)
    d._apply(key(bob), record(bob, NOW))
    clock.advance(TTL + 0.5)
    d.deaf()
    clock.advance(5.0)
    d.hear()
    assert d.is_gone(key(bob)) and not d.instances("bob")


def test_beat_codec_round_trip(bob: Identity) -> None:
    """A beat decodes to what was signed, and verifies only with the signer's key."""
    b = decode_beat(beat(bob, NOW, up=7))
    assert (b.prefix, b.agent, b.instance, b.ts, b.up) == ("mesh", bob.agent, bob.instance, NOW, 7)
    b.verify(bob.certificate.sign_pk)
    with pytest.raises(Unauthenticated):
        b.verify(bytes(32))


def test_a_beat_with_another_context_is_refused(bob: Identity) -> None:
    """A signed body that does not start with the beat context is not a beat."""
    body = msgpack.packb(
        ["mesh-enrol-v1", "mesh", bob.agent, bob.instance, 1, 1], use_bin_type=True
    )
    raw = msgpack.packb([body, bob.keys.signing.sign(body).signature], use_bin_type=True)
    with pytest.raises(DecodeError):
        decode_beat(raw)
    assert BEAT_CONTEXT == "mesh-beat-v1"


@given(st.binary(max_size=600))
def test_junk_never_decodes_as_anything_but_decode_error(raw: bytes) -> None:
    """Whatever arrives on the beat subject, decoding fails only with ``DecodeError``."""
    with contextlib.suppress(DecodeError):
        decode_beat(raw)
